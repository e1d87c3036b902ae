"""TextStreamer: UTF-8 safe streaming and stop strings, with the real tokenizer."""

from __future__ import annotations

from router.text import TextStreamer


def stream(tokenizer, text: str, stop=None, step: int = 1):
    ids = tokenizer.encode(text)
    streamer = TextStreamer(tokenizer, stop)
    chunks = [streamer.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    chunks.append(streamer.flush())
    return ids, chunks


def test_multibyte_characters_are_sent_whole(tokenizer):
    text = "Emoji 🎉 and accents: café, naïve, 日本語."
    ids, chunks = stream(tokenizer, text)
    assert all("\ufffd" not in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == text
    assert [t for c in chunks for t in c.token_ids] == ids
    for c in chunks:  # each message's text is exactly its tokens' text
        assert tokenizer.decode(c.token_ids) == c.text


def test_stop_string_ends_the_stream_and_is_not_output(tokenizer):
    text = "First line.\nSecond line.\nThird line."
    _, chunks = stream(tokenizer, text, stop=["Second"])
    out = "".join(c.text for c in chunks)
    assert out == "First line.\n"
    assert any(c.stopped for c in chunks)


def test_text_that_may_begin_a_stop_string_is_held_back(tokenizer):
    streamer = TextStreamer(tokenizer, ["END!"])
    first = streamer.push(tokenizer.encode("Hello EN"))
    assert "EN" not in first.text
    second = streamer.push(tokenizer.encode("D? no"))
    tail = streamer.flush()
    assert first.text + second.text + tail.text == "Hello END? no"


def test_stop_string_inside_one_token_keeps_the_text_before_it(tokenizer):
    _, chunks = stream(tokenizer, "alpha beta gamma", stop=["ta g"], step=3)
    assert "".join(c.text for c in chunks) == "alpha be"

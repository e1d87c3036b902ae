"""End to end over real gRPC: router, drafter and verifier as separate OS processes, the real default target.

Greedy output with speculation on must be token for token the output with speculation off, and both must equal
transformers' own greedy `generate` on the same model.
"""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec import Client, InvalidArgumentError
from specdec.proto import generation_pb2, generation_pb2_grpc, session_pb2, verifier_pb2, verifier_pb2_grpc
from tests.conftest import ServerProcess, free_port

pytestmark = pytest.mark.e2e
MAX_NEW = 32
CONTEXT = 512


@pytest.fixture(scope="module")
def cluster():
    # --decode-ahead-steps 2: greedy decode chunks queue steps for the next one (the default on GPUs; 0 on a CPU),
    # so the tests below that compare speculation off with transformers run through them
    verifier = ServerProcess("verifier", "--max-sequence-length", str(CONTEXT), "--max-sessions", "8",
                             "--decode-ahead-steps", "2")
    drafter = ServerProcess("drafter", "--model", "ngram")
    router = ServerProcess("router", "--verifier", verifier.address, "--drafter", drafter.address,
                           "--max-new-tokens-limit", "1024")
    trained = ServerProcess("drafter")  # the shipped drafter, the default
    trained_router = ServerProcess("router", "--verifier", verifier.address, "--drafter", trained.address)
    yield {"verifier": verifier, "drafter": drafter, "router": router, "trained_router": trained_router}
    for p in (trained_router, trained, router, drafter, verifier):
        p.stop()


def collect(client: Client, **kwargs):
    chunks = list(client.generate(**kwargs))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1]


def test_speculation_on_equals_off_equals_transformers(cluster, chat_prompts, hf_target, tokenizer):
    """Token for token: n-gram drafter, the shipped trained drafter, speculation off, transformers' generate."""
    from router.service import chat_ids

    prompts = chat_prompts[::6][:8]
    assert len(prompts) == 8
    eos = hf_target.generation_config.eos_token_id
    total_steps = total_tokens = 0
    trained_steps = 0
    with Client(cluster["router"].address) as client, Client(cluster["trained_router"].address) as trained:
        for prompt in prompts:
            messages = prompt["messages"]
            on, text_on, last_on = collect(client, chat=messages, max_new_tokens=MAX_NEW, max_draft_tokens=5)
            drafted, _, last_trained = collect(trained, chat=messages, max_new_tokens=MAX_NEW, max_draft_tokens=5)
            trained_steps += last_trained.usage.verify_steps
            off, text_off, last_off = collect(client, chat=messages, max_new_tokens=MAX_NEW, max_draft_tokens=0)
            ids = chat_ids(tokenizer, messages)
            reference = hf_target.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids):]
            reference = [t for t in reference.tolist()]
            if eos in reference:
                reference = reference[: reference.index(eos)]
            assert on == off == drafted == reference, prompt["id"]
            assert text_on == text_off == tokenizer.decode(reference)
            # speculation off: one target pass per token after the first (plus one that produced EOS)
            ended_by_eos = last_off.finish_reason == generation_pb2.FINISH_REASON_EOS
            assert last_off.usage.draft_tokens == 0
            assert last_off.usage.verify_steps == len(off) - 1 + ended_by_eos
            assert last_on.usage.completion_tokens == len(on)
            assert last_on.usage.prompt_tokens == len(ids)
            total_steps += last_on.usage.verify_steps
            total_tokens += len(on)
    assert total_steps < total_tokens  # the n-gram drafter got some tokens accepted
    assert trained_steps < total_steps  # the trained drafter needs fewer target passes than n-gram


def test_sampling_with_a_seed_is_reproducible_through_the_stack(cluster):
    with Client(cluster["router"].address) as client:
        kwargs = dict(prompt="Write a haiku about the sea.", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
        first, _, last = collect(client, **kwargs)
        second, _, _ = collect(client, **kwargs)
    assert first == second
    assert last.finish_reason in (generation_pb2.FINISH_REASON_LENGTH, generation_pb2.FINISH_REASON_EOS)


def test_stop_string_finishes_with_stop(cluster):
    with Client(cluster["router"].address) as client:
        _, full, _ = collect(client, prompt="1, 2, 3, 4, 5, 6,", max_new_tokens=20)
        assert " 9" in full, full  # the model counts on; the stop below is really reached
        _, text, last = collect(client, prompt="1, 2, 3, 4, 5, 6,", max_new_tokens=20, stop=[" 9"])
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert text == full[: full.index(" 9")]


BAD_REQUESTS = {
    "no input": dict(sampling=generation_pb2.SamplingParams(max_new_tokens=4)),
    "empty prompt": dict(prompt="", sampling=generation_pb2.SamplingParams(max_new_tokens=4)),
    "max_new_tokens 0": dict(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=0)),
    "max_new_tokens over limit": dict(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=5000)),
    "temperature < 0": dict(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=4, temperature=-1)),
    "temperature NaN": dict(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=4, temperature=math.nan)),
    "top_p > 1": dict(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=4, top_p=1.5)),
    "top_p < 0": dict(prompt="hi", sampling=generation_pb2.SamplingParams(max_new_tokens=4, top_p=-0.1)),
    "token id outside vocabulary": dict(tokens=generation_pb2.TokenIds(ids=[1, 2, 49152]),
                                        sampling=generation_pb2.SamplingParams(max_new_tokens=4)),
    "negative token id": dict(tokens=generation_pb2.TokenIds(ids=[-5]),
                              sampling=generation_pb2.SamplingParams(max_new_tokens=4)),
    "prompt longer than context": dict(tokens=generation_pb2.TokenIds(ids=[42] * CONTEXT),
                                       sampling=generation_pb2.SamplingParams(max_new_tokens=4)),
    "bad chat role": dict(chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="wizard", content="x")]),
                          sampling=generation_pb2.SamplingParams(max_new_tokens=4)),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(cluster, case):
    address = cluster["router"].address
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(generation_pb2.GenerateRequest(**BAD_REQUESTS[case]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert len(info.value.details()) > 15  # a sentence a person can act on
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with Client(address) as client:
        assert client.complete(prompt="Hello", max_new_tokens=2)


def test_sdk_raises_typed_errors(cluster):
    with Client(cluster["router"].address) as client:
        with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
            client.complete(prompt="hi", max_new_tokens=0)


def _open(session_id, prompt, max_new=8):
    return verifier_pb2.VerifyRequest(open=session_pb2.SessionSpec(session_id=session_id, prompt_ids=prompt,
                                                                  max_new_tokens=max_new))


def test_rogue_drafter_fails_only_its_own_sessions(cluster, tokenizer):
    """A drafter speaking the Verify stream directly: malformed blocks error their session; the good one goes on."""
    prompt = tokenizer.encode("The capital of France is")
    with grpc.insecure_channel(cluster["verifier"].address) as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        outbox, replies = [], {}
        cond = threading.Condition()

        def requests():
            while True:
                with cond:
                    cond.wait_for(lambda: outbox)
                    message = outbox.pop(0)
                if message is None:
                    return
                yield message

        def send(message):
            with cond:
                outbox.append(message)
                cond.notify()

        def wait_reply(session_id, timeout=60):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if replies.get(session_id):
                    return replies[session_id].pop(0)
                time.sleep(0.01)
            raise TimeoutError(session_id)

        call = stub.Verify(requests())
        def read():
            try:
                for reply in call:
                    replies.setdefault(reply.session_id, []).append(reply)
            except grpc.RpcError:
                pass  # cancelled at the end of the test

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for sid in ("good", "vocab", "position", "long"):
            send(_open(sid, prompt))
        opened = {sid: wait_reply(sid) for sid in ("good", "vocab", "position", "long")}
        n = opened["vocab"].update.committed_length
        send(verifier_pb2.VerifyRequest(block=verifier_pb2.DraftBlock(session_id="vocab", committed_length=n,
                                                                      token_ids=[1, 10**6])))
        send(verifier_pb2.VerifyRequest(block=verifier_pb2.DraftBlock(session_id="position", committed_length=n + 3,
                                                                      token_ids=[1])))
        send(verifier_pb2.VerifyRequest(block=verifier_pb2.DraftBlock(session_id="long", committed_length=n,
                                                                      token_ids=[1] * 100)))
        for sid, needle in (("vocab", "vocabulary"), ("position", "committed"), ("long", "at most")):
            reply = wait_reply(sid)
            assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], sid
            assert needle in reply.error.message
        reply = opened["good"]
        while not reply.update.finish_reason:
            send(verifier_pb2.VerifyRequest(block=verifier_pb2.DraftBlock(
                session_id="good", committed_length=reply.update.committed_length)))
            reply = wait_reply("good")
            assert not reply.HasField("error")
        assert reply.update.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        send(None)
        call.cancel()


def test_a_missing_drafter_never_fails_a_request(cluster):
    dead = f"127.0.0.1:{free_port()}"
    router = ServerProcess("router", "--verifier", cluster["verifier"].address, "--drafter", dead)
    try:
        with Client(cluster["router"].address) as healthy, Client(router.address) as degraded:
            expected, _, _ = collect(healthy, prompt="The three primary colors are", max_new_tokens=12)
            got, _, last = collect(degraded, prompt="The three primary colors are", max_new_tokens=12)
        assert got == expected
        assert last.usage.draft_tokens == 0  # the session went on with speculation off
    finally:
        router.stop()


def test_sigterm_drains_sessions_in_flight_then_exits():
    # a grace far longer than the 40 tokens need, so a loaded machine cannot turn the drain into a timeout
    verifier = ServerProcess("verifier", "--max-sequence-length", "256", "--grace", "120")
    router = ServerProcess("router", "--verifier", verifier.address)
    try:
        received = []
        with Client(router.address) as client:
            stream = client.generate(prompt="Count slowly: one, two, three,", max_new_tokens=40, max_draft_tokens=0)
            received.append(next(stream))
            verifier.proc.send_signal(15)
            time.sleep(0.5)
            with grpc.insecure_channel(verifier.address) as channel:  # new sessions are refused while draining
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            received.extend(stream)
        assert received[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in received) == 40
        assert verifier.proc.wait(30) == 0
    finally:
        router.stop()
        verifier.stop()


def test_cancelled_requests_free_their_kv_at_once(cluster):
    address = cluster["router"].address
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for _ in range(10):  # more cancelled sessions than the verifier has KV slots
            request = generation_pb2.GenerateRequest(prompt="Tell me a long story.",
                                                     sampling=generation_pb2.SamplingParams(max_new_tokens=500))
            call = stub.Generate(request)
            next(call)
            call.cancel()
    time.sleep(1)
    with Client(address) as client:
        assert client.complete(prompt="Hi", max_new_tokens=3)


def test_a_busy_verifier_asks_speculating_sessions_for_empty_blocks(cluster, tokenizer):
    """More sessions than drafts pay for on this device (1 on CPU): every verdict asks for empty blocks
    (max_draft_tokens = 0), an empty block is a plain decode step of one token, a session alone again gets no limit,
    and a seeded sampled session never gets one (its output must not depend on load)."""
    import asyncio

    from drafter_service.link import VerifierLink

    ids = tokenizer.encode("Write a list of colors:")

    def spec(session_id, **sampling):
        return session_pb2.SessionSpec(session_id=session_id, prompt_ids=ids, max_new_tokens=16, **sampling)

    with grpc.insecure_channel(cluster["verifier"].address) as channel:  # the advice the rule follows, for routers too
        info = verifier_pb2_grpc.VerifierServiceStub(channel).GetModelInfo(verifier_pb2.GetModelInfoRequest())
    assert (info.speculation_max_sessions, info.draft_tokens) == (1, 3)  # measured on CPUs (docs/benchmarks.md)

    async def run():
        link = VerifierLink(cluster["verifier"].address)
        try:
            alone = await link.open(spec("busy-a"))
            assert not alone.HasField("max_draft_tokens")
            second = await link.open(spec("busy-b"))
            assert second.HasField("max_draft_tokens") and second.max_draft_tokens == 0
            seeded = await link.open(spec("busy-c", temperature=0.7, seed=5))
            assert not seeded.HasField("max_draft_tokens")
            step = await link.send_block(verifier_pb2.DraftBlock(
                session_id="busy-a", committed_length=alone.update.committed_length))
            assert len(step.update.token_ids) == 1 and step.accepted == 0
            assert step.HasField("max_draft_tokens") and step.max_draft_tokens == 0
            link.close_session("busy-b")
            link.close_session("busy-c")
            await asyncio.sleep(0.5)  # the closes reach the verifier
            step = await link.send_block(verifier_pb2.DraftBlock(
                session_id="busy-a", committed_length=step.update.committed_length))
            assert not step.HasField("max_draft_tokens")  # alone again: draft as much as pays
            link.close_session("busy-a")
        finally:
            await link.aclose()

    asyncio.run(run())


def test_sessions_sharing_a_stream_go_in_batched_messages_with_the_same_verdicts(cluster, tokenizer):
    """A drafter's link sends the requests queued together as one VerifyBatch (the verifier says it takes them) and
    the verifier answers such a stream in batched messages: four sessions opened and stepped at once cost fewer
    messages than requests and than verdicts, and commit the tokens the same sessions commit over a link sending
    one message each (a verifier without verify_batches), which gets one verdict a message back."""
    import asyncio

    from drafter_service.link import VerifierLink

    prompts = ["Write a list of colors:", "Name three rivers.", "Count to five:", "What is rain?"]

    async def run(batches: bool) -> tuple[list[list[int]], int, int]:
        link = VerifierLink(cluster["verifier"].address)
        info = await link.model_info()
        assert info.verify_batches
        if not batches:  # as a verifier from before batches would answer
            info = verifier_pb2.GetModelInfoResponse()
            info.CopyFrom(await link.model_info())
            info.verify_batches = False
            link._info = asyncio.get_running_loop().create_future()
            link._info.set_result(info)
        names = [f"{'b' if batches else 'o'}{i}" for i in range(len(prompts))]
        try:
            verdicts = await asyncio.gather(*(link.open(session_pb2.SessionSpec(
                session_id=name, prompt_ids=tokenizer.encode(p), max_new_tokens=6)) for name, p in zip(names, prompts)))
            tokens = {name: list(v.update.token_ids) for name, v in zip(names, verdicts)}
            requests = len(prompts)
            live = [(name, v) for name, v in zip(names, verdicts) if not v.update.finish_reason]
            while live:  # plain decode steps (empty blocks) until each session finishes
                verdicts = await asyncio.gather(*(link.send_block(verifier_pb2.DraftBlock(
                    session_id=name, committed_length=v.update.committed_length)) for name, v in live))
                requests += len(live)
                for (name, _), v in zip(live, verdicts):
                    tokens[name].extend(v.update.token_ids)
                live = [(name, v) for (name, _), v in zip(live, verdicts) if not v.update.finish_reason]
            return list(tokens.values()), (link.messages_sent, link.messages_received), requests
        finally:
            await link.aclose()

    batched, messages, requests = asyncio.run(run(True))
    one_by_one, messages_alone, _ = asyncio.run(run(False))
    assert batched == one_by_one and sum(map(len, batched)) > len(prompts)
    assert messages_alone == (requests, requests)  # each request and each verdict a message of its own
    assert messages[0] < requests and messages[1] < requests


@pytest.fixture(scope="module")
def small_drafter_dir(tmp_path_factory, hf_target, tokenizer):
    """A plain Hugging Face model with the target's tokenizer: the target cut to its first 20 of 30 layers."""
    import copy

    model = copy.deepcopy(hf_target)
    model.model.layers = model.model.layers[:20]
    model.config.num_hidden_layers = 20
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:20]
    directory = tmp_path_factory.mktemp("drafter")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def check_lossless_and_seeded(client, prompts, max_new_tokens, sampled_prompt, seed, sampled_tokens):
    """Greedy with drafts equals without (asserted per prompt); the same seed gives the same sampled output twice
    (asserted). Returns the greedy runs' last usages and the sampled run's."""
    usages = []
    for prompt in prompts:
        kwargs = dict(chat=prompt["messages"], max_new_tokens=max_new_tokens)
        on, _, last = collect(client, max_draft_tokens=4, **kwargs)
        off, _, _ = collect(client, max_draft_tokens=0, **kwargs)
        assert on == off, prompt["id"]
        usages.append(last.usage)
    kwargs = dict(prompt=sampled_prompt, max_new_tokens=sampled_tokens, temperature=0.7, seed=seed, max_draft_tokens=4)
    first, _, last = collect(client, **kwargs)
    second, _, _ = collect(client, **kwargs)
    assert first == second
    return usages, last.usage


def test_model_drafter_is_lossless_greedy_and_seeded_sampling(cluster, small_drafter_dir, chat_prompts):
    drafter = ServerProcess("drafter", "--model", str(small_drafter_dir))
    router = ServerProcess("router", "--verifier", cluster["verifier"].address, "--drafter", drafter.address)
    try:
        with Client(router.address) as client:
            # sampling: the drafter declares its top-64 distributions; same seed, same output
            greedy, sampled = check_lossless_and_seeded(client, chat_prompts[1:4], 24, "A short poem about autumn:",
                                                        11, 16)
        assert sum(u.accepted_draft_tokens for u in greedy) > 0  # the model drafter really drafted, some was right
        assert sampled.draft_tokens > 0
    finally:
        router.stop()
        drafter.stop()


def test_proactive_drafting_is_lossless(cluster):
    drafter = ServerProcess("drafter", "--model", "ngram", "--proactive", "yes")
    router = ServerProcess("router", "--verifier", cluster["verifier"].address, "--drafter", drafter.address)
    try:
        prompt = "List the numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,"
        with Client(router.address) as client:
            on, _, last = collect(client, prompt=prompt, max_new_tokens=24, max_draft_tokens=4)
            off, _, _ = collect(client, prompt=prompt, max_new_tokens=24, max_draft_tokens=0)
        assert on == off
        assert last.usage.accepted_draft_tokens > 0
    finally:
        router.stop()
        drafter.stop()


@pytest.fixture(scope="module")
def feature_drafter_dir(tmp_path_factory, hf_target):
    """A feature-level drafter artifact for the real target, as train-drafter starts one (untrained: the target's
    last layer, fc summing token and feature): enough to prove the hidden states travel and output stays exact."""
    from specdec import drafter_model, models
    from specdec.feature_drafter import FeatureDrafterModel

    embed, lm_head = drafter_model.target_head_weights(models.DEFAULT_TARGET)
    config = {k: v for k, v in hf_target.config.to_dict().items() if k not in drafter_model.CHECKPOINT_ONLY_KEYS}
    model = FeatureDrafterModel(config, embed, lm_head, None)
    model.init_from_target(hf_target)
    directory = tmp_path_factory.mktemp("feature-drafter")
    drafter_model.save_drafter(directory, model, target=models.DEFAULT_TARGET, training={}, draft_vocab=None,
                               target_hash_hex=drafter_model.target_hash(embed, lm_head), kind="feature",
                               state=model.own_state())
    return directory


def test_feature_drafter_reads_the_verifiers_hidden_states_and_stays_lossless(cluster, feature_drafter_dir,
                                                                               chat_prompts):
    drafter = ServerProcess("drafter", "--model", str(feature_drafter_dir), "--proactive", "yes")
    router = ServerProcess("router", "--verifier", cluster["verifier"].address, "--drafter", drafter.address)
    try:
        with Client(router.address) as client:
            greedy, sampled = check_lossless_and_seeded(client, chat_prompts[2:4], 20, "A short poem about rain:", 5, 12)
        assert sum(u.draft_tokens for u in greedy) > 0  # zero if the features never reached the drafter
        assert sampled.draft_tokens > 0
    finally:
        router.stop()
        drafter.stop()


@pytest.fixture(scope="module")
def fused_drafter_dir(tmp_path_factory):
    """The shipped feature drafter made a fused one reading the target's layers 2, 15 and 29, as train-drafter
    --layers fused --init-from starts one: its fuse passes the last layer's state through, so it drafts what the
    shipped drafter does, from the last of the three layers the verifier sends it side by side."""
    from specdec import drafter_model, models
    from specdec.feature_drafter import FeatureDrafterModel, load_feature_drafter
    from tests.conftest import ROOT

    shipped_dir = ROOT / "drafters" / "smollm2-135m-instruct-feature"
    shipped = load_feature_drafter(shipped_dir, models.DEFAULT_TARGET)
    config, embed, lm_head, _ = drafter_model.checked_artifact(shipped_dir, models.DEFAULT_TARGET)
    model = FeatureDrafterModel(config["llama"], embed, lm_head, config["draft_vocab"],
                                num_layers=shipped.config.num_hidden_layers, taps=[2, 15, 29])
    model.lm.model.layers.load_state_dict(shipped.lm.model.layers.state_dict())
    model.lm.model.norm.load_state_dict(shipped.lm.model.norm.state_dict())
    model.fc.load_state_dict(shipped.fc.state_dict())
    directory = tmp_path_factory.mktemp("fused-drafter")
    drafter_model.save_drafter(directory, model, target=models.DEFAULT_TARGET, training={},
                               draft_vocab=config["draft_vocab"], target_hash_hex=config["target_hash"],
                               kind="feature", state=model.own_state(), taps=model.taps)
    return directory


def test_fused_drafter_reads_several_layers_states_and_stays_lossless(cluster, fused_drafter_dir, chat_prompts):
    """The drafter asks the verifier for its taps' states (SessionSpec.feature_layers) and reads them side by side."""
    drafter = ServerProcess("drafter", "--model", str(fused_drafter_dir))
    router = ServerProcess("router", "--verifier", cluster["verifier"].address, "--drafter", drafter.address)
    try:
        with Client(router.address) as client:
            greedy, sampled = check_lossless_and_seeded(client, chat_prompts[3:4], 20, "A short poem about rain:", 5, 12)
        # zero when the verifier sends the last layer's states only: the drafter's sessions fail, the router decodes
        assert greedy[0].accepted_draft_tokens > 0
        assert sampled.draft_tokens > 0
    finally:
        router.stop()
        drafter.stop()


def test_drafters_draft_the_trees_their_verifier_advises_and_stay_lossless(chat_prompts):
    """A verifier advising 2x2 trees (`--advise-draft-tree`; measured by default) and the default drafter, which
    follows the advice (`--draft-tree auto`): the blocks are trees, greedy output equals speculation off and a
    seeded sampled request replays."""
    verifier = ServerProcess("verifier", "--max-sequence-length", str(CONTEXT), "--max-sessions", "4",
                             "--advise-draft-tree", "2x2")
    drafter = ServerProcess("drafter")
    router = ServerProcess("router", "--verifier", verifier.address, "--drafter", drafter.address)
    try:
        with Client(router.address) as client:
            greedy, sampled = check_lossless_and_seeded(client, chat_prompts[7:8], 24, "A short poem about wind:", 5, 16)
        steps = sum(u.verify_steps for u in greedy)
        assert sum(u.draft_tokens for u in greedy) > 4 * steps  # 2x2 trees 4 deep: up to 14 tokens a block
        assert sampled.draft_tokens > 0
    finally:
        for p in (router, drafter, verifier):
            p.stop()


def test_draft_trees_through_the_stack_stay_lossless(cluster, chat_prompts):
    """The shipped fused drafter drafting trees (`--draft-tree 3x2`, 4 deep: up to 21 tokens a block) to a verifier
    in its own process: greedy output equals speculation off, a seeded sampled request replays, and the verify
    steps each commit more than one token on average (the trees are really verified, not refused)."""
    drafter = ServerProcess("drafter", "--draft-tree", "3x2")  # the default drafter: the shipped fused one
    router = ServerProcess("router", "--verifier", cluster["verifier"].address, "--drafter", drafter.address)
    try:
        with Client(router.address) as client:
            greedy, sampled = check_lossless_and_seeded(client, chat_prompts[4:6], 24, "A short poem about snow:", 3, 16)
        steps, accepted = sum(u.verify_steps for u in greedy), sum(u.accepted_draft_tokens for u in greedy)
        assert sum(u.draft_tokens for u in greedy) > 4 * steps  # trees: more tokens a block than its depth
        assert (accepted + steps) / steps > 1.5
        assert sampled.draft_tokens > 0 and sampled.accepted_draft_tokens > 0
    finally:
        router.stop()
        drafter.stop()

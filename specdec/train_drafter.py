"""`specdec train-drafter`: train a small drafter for a target by self-distillation.

The target writes its own training text. Prompts are built here (topics x instruction styles), plus prompts the
target writes itself (questions about a topic, and passages to summarize or rewrite); the target answers them
through its chat template, half greedily and half at temperature 0.7. A drafter of a few Llama layers, started
from evenly spaced layers of the target and sharing its frozen embeddings and LM head, then learns the target's
next-token distribution on those prompt + answer sequences: the loss is KL(target_probs || draft_probs) at every
answer position, with target_probs computed on the fly from the target's logits.

`--layers feature` trains a feature-level drafter instead (specdec.feature_drafter: one layer fed the target's
last hidden states, captured from the same forward pass, trained on three unrolled drafting steps). Several
drafters (`--layers 2,4,feature`) train side by side on the same batches, sharing the target's forward pass; each
is written to its own artifact (`OUT/L2`, `OUT/L4`, `OUT/feature`); `feature2` is a feature drafter of two layers.
`--gen-devices cuda:0,cuda:1` has several GPUs write the text at once. Generated data and checkpoints live in
`--work-dir` (default `OUT/train-state`), so `--resume` continues a stopped run. Never trains on
../shared/prompts/chat.jsonl, which is for measurement.

This module owns the data recipe and the training loop; the artifact format is specdec.drafter_model's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec import drafter_model, models

TOPICS = [
    # science and nature
    "black holes", "photosynthesis", "plate tectonics", "the water cycle", "DNA replication", "volcanoes",
    "the immune system", "climate change", "electricity", "magnetism", "gravity", "the speed of light",
    "evolution by natural selection", "bees and pollination", "coral reefs", "rainforests", "the human heart",
    "sleep", "nutrition and protein", "antibiotics", "the periodic table", "chemical bonds", "the moon's phases",
    "solar eclipses", "earthquakes", "ocean tides", "renewable energy", "nuclear fusion", "batteries",
    "the brain and memory", "bacteria and viruses", "genetics", "dinosaurs", "the solar system", "Mars",
    # technology and computing
    "recursion", "binary search", "sorting algorithms", "linked lists", "databases and SQL", "REST APIs",
    "version control with git", "unit testing", "object-oriented programming", "functional programming",
    "Python dictionaries", "JavaScript promises", "memory management", "operating systems", "the internet",
    "encryption", "passwords and security", "machine learning", "neural networks", "cloud computing",
    "regular expressions", "web browsers", "compilers", "spreadsheets", "smartphones", "3D printing",
    "caching", "concurrency and threads", "big-O notation", "open source software", "Linux command line",
    # math
    "prime numbers", "fractions", "percentages", "probability", "the Pythagorean theorem", "linear equations",
    "compound interest", "averages and medians", "geometry of circles", "statistics", "logarithms", "infinity",
    # history and society
    "the Roman Empire", "the printing press", "the Industrial Revolution", "ancient Egypt", "the Renaissance",
    "democracy", "the history of money", "world trade", "the Silk Road", "the invention of the telephone",
    "space exploration", "the Olympic Games", "human rights", "city planning", "public libraries",
    # everyday life
    "cooking pasta", "baking bread", "making coffee", "gardening", "houseplants", "composting", "budgeting",
    "saving money", "job interviews", "writing a resume", "time management", "studying for exams",
    "learning a language", "running", "yoga", "healthy breakfast", "camping", "traveling on a budget",
    "moving to a new city", "adopting a dog", "caring for a cat", "cleaning a kitchen", "public speaking",
    "making friends", "remote work", "team meetings", "writing emails", "negotiating a salary", "meditation",
    "first aid", "bicycle maintenance", "painting a room", "birthday parties", "board games", "photography",
    # arts and culture
    "poetry", "jazz", "classical music", "learning the guitar", "film making", "short stories", "museums",
    "architecture", "fairy tales", "mythology", "chess", "soccer", "basketball", "video games", "theater",
    # economics and business
    "inflation", "supply and demand", "starting a small business", "marketing", "customer service",
    "stock markets", "insurance", "taxes", "renting versus buying a home", "electric cars",
    # more of everything: the wider the topics, the less the drafter leans on a few
    "rainbows", "thunderstorms", "glaciers", "deserts", "the ozone layer", "black and white photography", "owls",
    "whales", "ants", "mushrooms", "the human skeleton", "muscles", "vitamins", "allergies", "the flu",
    "microwave ovens", "airplanes", "submarines", "bridges", "skyscrapers", "trains", "GPS",
    "wind turbines", "solar panels", "recycling plastic", "water purification", "binary trees",
    "graphs and networks", "APIs", "HTML and CSS", "Docker containers", "keyboard shortcuts", "email spam",
    "artificial intelligence", "robots", "virtual reality", "ancient Greece", "the Vikings",
    "the Great Wall of China", "the pyramids", "the French Revolution", "the Cold War", "the Moon landing",
    "the Internet's history", "tea", "chocolate", "spices", "vegetarian cooking", "meal planning", "knitting",
    "woodworking", "hiking safety", "swimming", "tennis", "cycling to work", "learning to drive", "parenting",
    "homework habits", "online shopping", "credit cards", "retirement savings", "volunteering", "voting",
    "friendship", "kindness", "stress", "procrastination", "habits", "motivation", "creativity", "curiosity",
    "dancing", "opera", "painting with watercolors", "comic books", "novels", "libraries", "podcasts",
    "time zones", "calendars", "maps", "languages of the world", "sign language",
]

# {topic} is filled in; every style reads as a plain chat request.
STYLES = [
    "Explain {topic} in simple terms.",
    "What is {topic}? Give a short explanation.",
    "Why does {topic} matter?",
    "Describe how {topic} works, step by step.",
    "Give me three interesting facts about {topic}.",
    "List five key ideas about {topic}.",
    "Write a short poem about {topic}.",
    "Write a short story that involves {topic}.",
    "Explain {topic} to a ten-year-old.",
    "What are the pros and cons of {topic}?",
    "What are common mistakes people make about {topic}?",
    "Give me some practical tips about {topic}.",
    "Compare {topic} with something from everyday life.",
    "What is the history of {topic}?",
    "Write a haiku about {topic}.",
    "How would you teach {topic} to a beginner?",
    "Summarize the most important things to know about {topic} in one paragraph.",
    "What questions should I ask to understand {topic} better?",
    "Write a short blog post introduction about {topic}.",
    "I am confused about {topic}. Can you help?",
    "Give an example that illustrates {topic}.",
    "What is a common misconception about {topic}?",
    "Write a friendly email to a colleague about {topic}.",
    "Create a simple quiz with three questions about {topic}.",
    "How is {topic} related to daily life?",
    "Write a limerick about {topic}.",
    "What would happen if {topic} did not exist?",
    "Give me a one-sentence definition of {topic}.",
    "Outline a short presentation on {topic}.",
    "Tell me something surprising about {topic}.",
    "How do I get started with {topic}?",
    "What should a beginner know about {topic}?",
    "Write a short dialogue between two friends talking about {topic}.",
    "Describe {topic} in one paragraph.",
    "Give me a checklist for {topic}.",
    "What are the main parts of {topic}?",
    "Write a short news headline and summary about {topic}.",
    "Answer briefly: what is the most important fact about {topic}?",
    "Write a motivational message about {topic}.",
    "What are two opposing views on {topic}?",
    "Explain {topic} using an analogy.",
    "Write a product description that mentions {topic}.",
]

# Prompts naming two topics, a number or a list: comparisons, lists and ordering tasks.
PAIR_STYLES = [
    "What is the difference between {topic} and {other}?",
    "How are {topic} and {other} connected?",
    "Which is more useful to learn about first, {topic} or {other}? Why?",
]
LIST_STYLES = [
    "Name {n} things related to {topic}.",
    "List {n} questions a student might ask about {topic}.",
    "Give me {n} ideas for a project about {topic}.",
    "Put these words in alphabetical order: {words}.",
    "Which of these is the odd one out, and why: {words}?",
    "Write one sentence that uses all of these words: {words}.",
]
WORDS = ["apple", "river", "candle", "mountain", "pencil", "tiger", "cloud", "window", "guitar", "bread", "planet",
         "garden", "bottle", "train", "mirror", "forest", "ladder", "coffee", "violin", "island", "jacket", "lemon"]

CODE_TASKS = [
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that counts the words in a sentence.",
    "Write a Python function that returns the largest element of a list.",
    "Write a Python function that computes the factorial of n.",
    "Write a Python function that merges two sorted lists.",
    "Write a JavaScript function that removes duplicates from an array.",
    "Write a SQL query that selects all users older than 30.",
    "Write a Python class for a simple bank account.",
    "Write a Python function that computes Fibonacci numbers.",
    "Write a Python script that reads a file and prints each line.",
    "Write a function that checks whether a string is a palindrome.",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python function that sums the even numbers in a list.",
    "Write a bash command that counts the files in a directory.",
    "Write a Python function that finds the average of a list of numbers.",
]

MATH_TEMPLATES = [
    "What is {a} plus {b}?",
    "What is {a} times {b}?",
    "If I have {a} apples and give away {b}, how many are left?",
    "A train travels {a} km in {b} hours. What is its average speed?",
    "What is {b} percent of {a}?",
    "Solve for x: x + {b} = {a}.",
    "A rectangle is {a} cm long and {b} cm wide. What is its area?",
    "Is {a} an even or odd number? Explain.",
]

# The target writes prompts too: more varied wording than any template list (half the data comes from these).
SELF_PROMPTS = [
    "Write one question that a curious person might ask about {topic}. Reply with the question only.",
    "Write a request that someone might send to an AI assistant about {topic}. Reply with the request only.",
    "Write a short task for a student about {topic}. Reply with the task only.",
    "What is a question a beginner could ask about {topic}? Reply with the question only.",
]
SELF_PASSAGE = "Write a short paragraph about {topic}."
PASSAGE_TASKS = [
    "Summarize the following text in one sentence:\n\n{passage}",
    "Rewrite the following text in a more formal tone:\n\n{passage}",
    "Rewrite the following text so a child can understand it:\n\n{passage}",
    "Give the main points of this text as a bulleted list:\n\n{passage}",
    "Suggest a title for this text:\n\n{passage}",
    "Correct any grammar or spelling mistakes in this text:\n\n{passage}",
    "Make this text shorter without losing its meaning:\n\n{passage}",
    "What is the main idea of this text?\n\n{passage}",
]


def template_prompts(n: int, rng: random.Random) -> list[str]:
    """n prompts: topics x styles, plus code and arithmetic tasks, comparisons, lists and word tasks."""
    prompts = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.08:
            prompts.append(rng.choice(CODE_TASKS))
        elif roll < 0.14:
            a, b = rng.randint(2, 500), rng.randint(2, 90)
            prompts.append(rng.choice(MATH_TEMPLATES).format(a=a, b=b))
        elif roll < 0.22:
            topic, other = rng.sample(TOPICS, 2)
            prompts.append(rng.choice(PAIR_STYLES).format(topic=topic, other=other))
        elif roll < 0.30:
            words = ", ".join(rng.sample(WORDS, rng.randint(3, 6)))
            style = rng.choice(LIST_STYLES)
            prompts.append(style.format(n=rng.randint(3, 10), topic=rng.choice(TOPICS), words=words))
        else:
            prompts.append(rng.choice(STYLES).format(topic=rng.choice(TOPICS)))
    return prompts


def chat_ids(tokenizer, user_text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some transformers versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@torch.inference_mode()
def generate_answers(
    target, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device, desc: str,
    temperatures: tuple[float, ...] = (0.0, 0.7),
) -> list[list[int]]:
    """The target's answers (token ids, through its end-of-turn token) to chat-templated prompts.

    Batches alternate between the given temperatures; prompts are sorted by length to waste little padding.
    """
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", file=sys.stderr, dynamic_ncols=True)
    generated, started = 0, time.perf_counter()
    for batch_no, first in enumerate(range(0, len(order), batch_size)):
        index = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in index)
        input_ids = torch.full((len(index), width), pad, dtype=torch.long)
        attention = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):  # left padding: every row's next token goes at the same column
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]) :] = 1
        temperature = temperatures[batch_no % len(temperatures)]
        sampling = dict(do_sample=False)
        if temperature:
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        out = target.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=pad, **sampling,
        )
        for row, i in enumerate(index):
            ids = out[row, width:].tolist()
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            answers[i] = ids
            generated += len(ids)
        bar.update(len(index))
        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}")
    bar.close()
    return answers


def build_dataset(target, tokenizer, n: int, gen_tokens: int, batch_size: int, device, seed: int) -> list[dict]:
    """n (prompt_ids, answer_ids) pairs, shuffled: ~45% template prompts, ~45% target-written, ~10% passage tasks."""
    rng = random.Random(seed)
    n_questions, n_passages = n * 9 // 20, max(1, n // 10) if n >= 4 else 0
    n_template = n - n_questions - n_passages
    seeds = [rng.choice(SELF_PROMPTS).format(topic=rng.choice(TOPICS)) for _ in range(n_questions)]
    seeds += [SELF_PASSAGE.format(topic=rng.choice(TOPICS)) for _ in range(n_passages)]
    written = generate_answers(
        target, tokenizer, [chat_ids(tokenizer, s) for s in seeds], min(96, gen_tokens), batch_size, device,
        "target writes prompts", temperatures=(0.9,),
    )
    written_text = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in written]
    user_texts = template_prompts(n_template, rng)
    for text, fallback_topic in zip(written_text[:n_questions], TOPICS * (1 + n_questions // len(TOPICS))):
        question = next((line.strip() for line in text.splitlines() if line.strip()), "")
        user_texts.append(question or f"Tell me about {fallback_topic}.")
    for text in written_text[n_questions:]:
        user_texts.append(rng.choice(PASSAGE_TASKS).format(passage=text or "The weather was nice today."))
    prompt_ids = [chat_ids(tokenizer, t) for t in user_texts]
    answers = generate_answers(target, tokenizer, prompt_ids, gen_tokens, batch_size, device, "target answers")
    dataset = [{"prompt": p, "answer": a} for p, a in zip(prompt_ids, answers) if a]
    rng.shuffle(dataset)  # so the held-out slice is a sample of every kind of prompt
    return dataset


def _generate_share(target_spec: str, device: str, n: int, gen_tokens: int, batch_size: int, seed: int) -> list[dict]:
    """One --gen-devices worker (its own process): the target on `device` writes n sequences."""
    tokenizer = models.load_tokenizer(target_spec)
    on_gpu = torch.device(device).type == "cuda"
    target = models.load_hf_model(target_spec, device=device, dtype=torch.bfloat16 if on_gpu else torch.float32)
    return build_dataset(target, tokenizer, n, gen_tokens, batch_size, torch.device(device), seed)


def build_dataset_spread(target_spec: str, devices: list[str], n: int, gen_tokens: int, batch_size: int,
                         seed: int) -> list[dict]:
    """build_dataset over several devices at once, one process each with its own share of the prompts and its own
    seed (so no two shares repeat each other's prompts or draws); shuffled together."""
    import multiprocessing

    shares = [n // len(devices) + (i < n % len(devices)) for i in range(len(devices))]
    jobs = [(target_spec, dev, share, gen_tokens, batch_size, seed + 7919 * i)
            for i, (dev, share) in enumerate(zip(devices, shares))]
    with multiprocessing.get_context("spawn").Pool(len(devices)) as pool:
        parts = pool.starmap(_generate_share, jobs)
    dataset = [ex for part in parts for ex in part]
    random.Random(seed).shuffle(dataset)
    return dataset


def choose_draft_vocab(dataset: list[dict], size: int, vocab_size: int, always: list[int]) -> list[int] | None:
    """The `size` ids the target says most often in its answers (plus `always`), sorted; None for the full head."""
    if not size or size >= vocab_size:
        return None
    counts = Counter(t for ex in dataset for t in ex["answer"])
    chosen = set(always)
    for token, _ in counts.most_common():
        if len(chosen) >= size:
            break
        chosen.add(token)
    # Fewer distinct tokens than asked (tiny runs): fill with the lowest unused ids so the head has `size` rows.
    next_id = 0
    while len(chosen) < size:
        chosen.add(next_id)
        next_id += 1
    return sorted(chosen)


def vocab_coverage(dataset: list[dict], draft_vocab: list[int] | None) -> float:
    if draft_vocab is None:
        return 1.0
    keep = set(draft_vocab)
    total = sum(len(ex["answer"]) for ex in dataset)
    return sum(t in keep for ex in dataset for t in ex["answer"]) / max(1, total)


def init_layers(num_layers: int, target_layers: int) -> list[int]:
    """Evenly spaced target layers, first and last included: where each drafter layer starts from."""
    if num_layers == 1:
        return [target_layers - 1]
    return [round(i * (target_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


# --layers entries for the feature-level drafters of specdec.feature_drafter: `feature` reads the target's last
# layer, `fused` several layers' (--fuse-layers; EAGLE-3); `feature2` / `fused2`: with 2 layers of its own
FEATURE, FUSED = "feature", "fused"


def _feature_kind(item) -> str | None:
    if isinstance(item, str):
        for kind in (FEATURE, FUSED):
            if item.startswith(kind):
                return kind
    return None


def parse_students(spec: str) -> list:
    """`--layers 2,4,feature,feature2,fused` -> [2, 4, "feature", "feature2", "fused"]."""
    out = []
    for item in str(spec).split(","):
        item = item.strip()
        if not item:
            continue
        kind = _feature_kind(item)
        if kind:
            count = item[len(kind):]
            if count and not (count.isdigit() and int(count) >= 1):
                raise SystemExit(f"--layers: {item!r} is not `{kind}` or `{kind}N` (N layers, e.g. {kind}2)")
            out.append(item)
        else:
            out.append(int(item))
    return out


def feature_layers(kind) -> int | None:
    """Layers of a feature drafter entry ("feature" -> 1, "fused2" -> 2); None for a token-level drafter."""
    prefix = _feature_kind(kind)
    return int(kind[len(prefix):] or 1) if prefix else None


def fuse_layers(spec: str, target_layers: int) -> list[int]:
    """`--fuse-layers`: "auto" is a low, a middle and the last layer (EAGLE-3's choice: 2, L / 2, L - 1); else a
    comma list of layer indices, which must end with the last layer."""
    last = target_layers - 1
    if spec == "auto":
        return sorted({min(2, last), target_layers // 2, last})
    taps = [int(i) for i in spec.split(",") if i.strip()]
    if not taps or taps[-1] != last or any(not 0 <= a < b for a, b in zip(taps, taps[1:])):
        raise SystemExit(f"--fuse-layers {spec!r}: increasing layer indices of the target (0..{last}), the last last")
    return taps


def student_name(kind) -> str:
    return kind if feature_layers(kind) else f"L{kind}"


def new_student(target, num_layers, embed, lm_head, draft_vocab, taps=None, base=None, base_name=None):
    """A drafter to train (its layers started from the target's, or for a feature drafter from `base`, the loaded
    feature drafter artifact `base_name`) and where it started from (target layers, or the artifact)."""
    cfg = target.config.to_dict()
    for key in drafter_model.CHECKPOINT_ONLY_KEYS:
        cfg.pop(key, None)
    layers = feature_layers(num_layers)
    if layers:
        from specdec.feature_drafter import FeatureDrafterModel

        fused = _feature_kind(num_layers) == FUSED
        student = FeatureDrafterModel(cfg, embed, lm_head, draft_vocab, num_layers=layers, taps=taps if fused else None)
        if base is not None:
            # its layers, norm and fc, and a fused artifact's `fuse`; a fused drafter started from a last-layer one
            # keeps its `fuse` passing the last layer through, so it starts out drafting as that one does
            if base.config.num_hidden_layers != layers or (base.taps and base.taps != student.taps):
                raise SystemExit(f"--init-from {base_name}: it has {base.config.num_hidden_layers} layer(s) and reads "
                                 f"layers {base.taps or 'last'}; {num_layers!r} needs {layers} layer(s) and reads "
                                 f"{student.taps or 'last'} (or the last alone, for a fused drafter)")
            student.lm.model.layers.load_state_dict(base.lm.model.layers.state_dict())
            student.lm.model.norm.load_state_dict(base.lm.model.norm.state_dict())
            student.fc.load_state_dict(base.fc.state_dict())
            if base.fuse is not None:
                student.fuse.load_state_dict(base.fuse.state_dict())
            return student, str(base_name)
        student.init_from_target(target)
        total = target.config.num_hidden_layers
        return student, list(range(total - layers, total))
    cfg["num_hidden_layers"] = num_layers
    student = drafter_model.build_drafter(cfg, embed, lm_head, draft_vocab)
    sources = init_layers(num_layers, target.config.num_hidden_layers)
    for mine, theirs in zip(student.model.layers, sources):
        mine.load_state_dict({k: v.float() for k, v in target.model.layers[theirs].state_dict().items()})
    student.model.norm.load_state_dict({k: v.float() for k, v in target.model.norm.state_dict().items()})
    return student, sources


def batches(dataset: list[dict], batch_size: int, max_len: int, rng: random.Random):
    """Endless random batches: input ids [batch, width] and the answer-position mask [batch, width]."""
    while True:
        order = list(range(len(dataset)))
        rng.shuffle(order)
        for first in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            rows = [dataset[i] for i in order[first : first + batch_size]]
            seqs = [(r["prompt"] + r["answer"])[:max_len] for r in rows]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            # mask[b, t]: position t predicts token t + 1, which is an answer token
            mask = torch.zeros(len(seqs), width, dtype=torch.bool)
            for b, (r, s) in enumerate(zip(rows, seqs)):
                ids[b, : len(s)] = torch.tensor(s)
                # from column 1 at least: a feature drafter's row j is position j + 1 (specdec.feature_drafter)
                mask[b, max(1, len(r["prompt"]) - 1) : len(s) - 1] = True
            yield ids, mask


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak as `progress` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def target_batch(target, ids, mask, vocab_index, taps=()) -> dict:
    """The target's side of a batch: probabilities (over the draft vocabulary) and top token at every masked
    position, its last hidden states before the final norm [batch, T, hidden] for feature drafters, and the
    outputs of the layers in `taps` ({layer: [batch, T, hidden]}) for fused ones."""
    captured, hooks = {}, []

    def keep(name):
        def hook(_module, inputs, output):
            out = inputs[0] if name == "last" else output
            captured[name] = out[0] if isinstance(out, tuple) else out
        return hook

    hooks.append(target.model.norm.register_forward_hook(keep("last")))
    for i in taps:
        hooks.append(target.model.layers[i].register_forward_hook(keep(i)))
    try:
        hidden = target.model(input_ids=ids).last_hidden_state[mask]  # [n_answer, hidden], after the norm
    finally:
        for hook in hooks:
            hook.remove()
    logits = target.lm_head(hidden).float()  # [n_answer, vocab]
    probs = logits.softmax(-1)
    if vocab_index is not None:
        probs = probs[:, vocab_index]  # [n_answer, draft_vocab]: mass outside is unreachable
    layers = {i: captured[i] for i in taps}
    layers[target.config.num_hidden_layers - 1] = captured["last"]
    return {"probs": probs, "top": logits.argmax(-1), "features": captured["last"], "layers": layers}


def student_features(student, tgt: dict) -> torch.Tensor:
    """What a feature drafter reads from the target's side of a batch: the last layer's states, or its taps'."""
    if not student.taps:
        return tgt["features"]
    return torch.cat([tgt["layers"][i] for i in student.taps], dim=-1)


def student_loss(student, ids, mask, tgt: dict, vocab_index, passes: int) -> tuple[torch.Tensor, list[float]]:
    """KL(target || draft) up to the target's entropy (no gradient) at the masked positions, and top-1 agreement
    with the target. A feature drafter is scored on each unrolled pass (drafting steps 1..passes, weights 0.8^d),
    plus a regression of its predicted features on the target's; agreement is reported per pass."""
    from specdec.feature_drafter import FeatureDrafterModel

    def agreement(logits, top):
        draft_top = logits.argmax(-1)
        if vocab_index is not None:
            draft_top = vocab_index[draft_top]
        return (draft_top == top).float().mean().item() if top.numel() else 0.0

    if not isinstance(student, FeatureDrafterModel):
        logits = student.lm_head(student.model(input_ids=ids).last_hidden_state[mask]).float()  # [n, draft_vocab]
        loss = -(tgt["probs"] * logits.log_softmax(-1)).sum(-1).mean()
        return loss, [agreement(logits, tgt["top"])]
    # Row j is token j + 1 and predicts what position j + 1 predicts: rows_mask = mask[:, 1:] (mask[:, 0] is
    # False: batches() masks answers only, and a prompt has at least one token)
    from specdec.feature_drafter import unit_rms

    rows_mask = mask[:, 1:]
    next_features = unit_rms(tgt["features"][:, 1:].float())
    j = torch.arange(rows_mask.shape[1], device=ids.device)[None]
    total, agree = 0.0, []
    for d, z in enumerate(student.unrolled(ids, student_features(student, tgt), passes)):
        valid = rows_mask & (j >= d)  # drafting step d + 1 needs d earlier rows
        picked = valid[rows_mask]
        if not picked.any():
            continue
        logits = student.logits(z[valid]).float()
        kl = -(tgt["probs"][picked] * logits.log_softmax(-1)).sum(-1).mean()
        # in unit-RMS space, as the next drafting step reads it: the huge dimensions do not take over the loss
        regression = F.smooth_l1_loss(unit_rms(z[valid].float()), next_features[valid])
        total = total + 0.8**d * (kl + regression)
        agree.append(agreement(logits, tgt["top"][picked]))
    return total, agree


@torch.no_grad()
def held_out_metrics(target, students, held_out, vocab_index, batch_size, max_len, device, autocast, passes,
                     taps=()) -> list[dict]:
    """Per student: mean loss and top-1 agreement with the target (per drafting step for a feature drafter) on
    sequences it never trained on."""
    sums = [{"loss": 0.0, "agree": None} for _ in students]
    count = 0
    stream = batches(held_out, min(batch_size, len(held_out)), max_len, random.Random(0))
    for _ in range(max(1, len(held_out) // max(1, batch_size))):
        ids, mask = next(stream)
        ids, mask = ids.to(device), mask.to(device)
        tgt = target_batch(target, ids, mask, vocab_index, taps)
        count += 1
        for acc, student in zip(sums, students):
            with autocast:
                loss, agree = student_loss(student, ids, mask, tgt, vocab_index, passes)
            acc["loss"] += float(loss)
            acc["agree"] = agree if acc["agree"] is None else [a + b for a, b in zip(acc["agree"], agree)]
    return [{"loss": round(acc["loss"] / count, 4), "agree": [round(a / count, 4) for a in acc["agree"] or []]}
            for acc in sums]


def add_parser(subparsers, summary: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-drafter",
        help=summary,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--target", default=models.DEFAULT_TARGET, help="target model SPEC (default: %(default)s)")
    p.add_argument("--target-name", help="name recorded in the artifact (default: the --target SPEC)")
    p.add_argument("--out", required=True, help="artifact directory (one per size under it when several --layers)")
    p.add_argument("--work-dir", help="generated data and checkpoints (default: OUT/train-state)")
    p.add_argument(
        "--layers", default="2",
        help="drafter layers, or `feature` for a feature-level (EAGLE-style) drafter that reads the target's hidden "
             "states (`feature2`: with two layers), or `fused` for one that reads several of the target's layers "
             "(--fuse-layers; EAGLE-3); a comma list (2,4,feature,fused) trains several side by side on the same "
             "batches",
    )
    p.add_argument("--fuse-layers", default="auto",
                   help="`fused` drafters: the target layers they read, comma-separated, the last last (default "
                        "auto: a low, a middle and the last layer, as EAGLE-3)")
    p.add_argument("--init-from", help="start feature drafters from this feature drafter artifact (same target and "
                                      "layer count) instead of the target's last layers")
    p.add_argument("--passes", type=int, default=3,
                   help="feature drafter: drafting steps unrolled in training, each fed the previous one's prediction")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (upper bound with --max-minutes)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop training after this long (0 = no limit)")
    p.add_argument(
        "--total-minutes", type=float, default=0,
        help="whole-run budget, generation included: training gets what generation leaves (0 = no limit)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per training step")
    p.add_argument("--max-len", type=int, default=512, help="tokens per training sequence, prompt included")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-prompts", type=int, default=4096, help="prompts the target answers")
    p.add_argument("--gen-tokens", type=int, default=256, help="max new tokens per answer")
    p.add_argument("--gen-batch-size", type=int, default=256, help="prompts per generate call")
    p.add_argument(
        "--gen-devices", default="",
        help="comma list of devices that write the training text at once, one process each (e.g. cuda:0,cuda:1); "
             "default: --device alone",
    )
    p.add_argument("--draft-vocab", type=int, default=16384, help="reduced draft head size (0 = full vocabulary)")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint and write artifacts every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="reuse generated data and continue from the checkpoint")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from tqdm import tqdm

    run_started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = parse_students(args.layers)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out / "train-state"
    work.mkdir(parents=True, exist_ok=True)
    command = "specdec " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "specdec train-drafter"

    tokenizer = models.load_tokenizer(args.target)
    target = models.load_hf_model(args.target, device=device, dtype=torch.bfloat16 if on_gpu else torch.float32)
    for param in target.parameters():
        param.requires_grad_(False)
    embed, lm_head = drafter_model.target_head_weights(args.target)
    target_hash = drafter_model.target_hash(embed, lm_head)

    data_file = work / "data.pt"
    gen_started = time.perf_counter()
    if args.resume and data_file.is_file():
        dataset = torch.load(data_file)
        print(f"reusing {len(dataset)} generated sequences from {data_file}", file=sys.stderr)
        gen_seconds = 0.0
    else:
        gen_devices = [d.strip() for d in args.gen_devices.split(",") if d.strip()] or [args.device]
        if len(gen_devices) > 1:
            dataset = build_dataset_spread(
                args.target, gen_devices, args.data_prompts, args.gen_tokens, args.gen_batch_size, args.seed
            )
        else:
            target.to(gen_devices[0])
            dataset = build_dataset(target, tokenizer, args.data_prompts, args.gen_tokens, args.gen_batch_size,
                                    torch.device(gen_devices[0]), args.seed)
            target.to(device)
        torch.save(dataset, data_file)
        gen_seconds = time.perf_counter() - gen_started
    # 2% held out (at least one sequence) to report agreement on text the drafter never trained on
    held_out_count = max(1, len(dataset) // 50) if len(dataset) > 1 else 0
    dataset, held_out = dataset[held_out_count:], dataset[:held_out_count]
    answer_tokens = sum(len(ex["answer"]) for ex in dataset)
    always = [t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None]
    draft_vocab = choose_draft_vocab(dataset, args.draft_vocab, embed.shape[0], always)
    coverage = vocab_coverage(dataset, draft_vocab)
    print(
        f"data: {len(dataset)} sequences, {answer_tokens} answer tokens (generated in {gen_seconds:.0f} s); "
        f"draft vocabulary {len(draft_vocab) if draft_vocab else embed.shape[0]} covers {coverage:.2%} of them",
        file=sys.stderr,
    )

    taps = fuse_layers(args.fuse_layers, target.config.num_hidden_layers)
    # the target layers (besides the last) whose outputs the batches keep: those `fused` students read
    batch_taps = tuple(taps[:-1]) if any(_feature_kind(n) == FUSED for n in sizes) else ()
    base = None  # --init-from's drafter, loaded once for every feature student
    if args.init_from and any(feature_layers(n) for n in sizes):
        from specdec.feature_drafter import load_feature_drafter

        base = load_feature_drafter(args.init_from, args.target)
    students, sources, optimizers = [], [], []
    for n in sizes:
        student, src = new_student(target, n, embed, lm_head, draft_vocab, taps, base, args.init_from)
        student.to(device).train()
        students.append(student)
        sources.append(src)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizers.append(torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95)))
    vocab_index = None if draft_vocab is None else torch.tensor(draft_vocab, device=device)

    step, resumed_seconds, checkpoint_file = 0, 0.0, work / "checkpoint.pt"
    if args.resume and checkpoint_file.is_file():
        state = torch.load(checkpoint_file, map_location=device)
        if state["layers"] != sizes or state["draft_vocab"] != draft_vocab:
            raise SystemExit(
                f"checkpoint {checkpoint_file} is for --layers {state['layers']}: not resumable with these"
            )
        for student, optimizer, s_state, o_state in zip(students, optimizers, state["students"], state["optimizers"]):
            student.load_state_dict(s_state, strict=False)
            optimizer.load_state_dict(o_state)
        step, resumed_seconds = state["step"], state.get("train_seconds", 0.0)
        print(f"resuming at step {step}", file=sys.stderr)

    def artifact_dir(n: int) -> Path:
        return out if len(sizes) == 1 else out / student_name(n)

    train_seconds = 0.0

    def save(final: bool, held_out: list[dict] | None = None) -> None:
        def own(m):  # what trains: not the target's frozen embeddings and head
            frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
            return {k: v for k, v in m.state_dict().items() if k not in frozen}

        torch.save(
            {
                "step": step, "train_seconds": train_seconds, "layers": sizes, "draft_vocab": draft_vocab,
                "students": [own(s) for s in students], "optimizers": [o.state_dict() for o in optimizers],
            },
            checkpoint_file,
        )
        for n, student, src in zip(sizes, students, sources):
            training = {
                "command": command, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                "steps": step, "batch_size": args.batch_size, "lr": args.lr, "sequences": len(dataset),
                "answer_tokens": answer_tokens, "gen_tokens": args.gen_tokens,
                ("init_from" if isinstance(src, str) else "init_from_target_layers"): src,
                "draft_vocab_coverage": round(coverage, 5), "generate_seconds": round(gen_seconds, 1),
                "train_seconds": round(train_seconds, 1), "final": final,
                "held_out": (held_out or [None] * len(sizes))[sizes.index(n)],
            }
            feature = bool(feature_layers(n))
            if feature:
                training["passes"] = args.passes
            drafter_model.save_drafter(
                artifact_dir(n), student, target=args.target_name or args.target, target_hash_hex=target_hash,
                draft_vocab=draft_vocab, training=training, kind="feature" if feature else "layers",
                state=student.own_state() if feature else None, taps=student.taps if feature else None,
            )

    if args.total_minutes:
        # keep ~30 s for the held-out pass and the final save
        left = (args.total_minutes * 60 - (time.perf_counter() - run_started) - 30) / 60 + resumed_seconds / 60
        args.max_minutes = max(0.1, min(args.max_minutes or left, left))
        print(f"training for at most {args.max_minutes:.1f} min (--total-minutes {args.total_minutes})",
              file=sys.stderr)
    rng = random.Random(args.seed + step)
    stream = batches(dataset, args.batch_size, args.max_len, rng)
    bar = tqdm(total=args.steps, initial=step, desc="train-drafter", unit="step", file=sys.stderr, dynamic_ncols=True)
    # `started` counts earlier sessions' training time too (the schedule and --max-minutes span a resumed run)
    session_started, tokens_seen = time.perf_counter(), 0
    started = session_started - resumed_seconds
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    while step < args.steps:
        if args.max_minutes and (time.perf_counter() - started) > args.max_minutes * 60:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", file=sys.stderr)
            break
        elapsed = time.perf_counter() - started
        # With a time limit the schedule follows the clock, so a run cut short still ends at a low learning rate.
        progress = max(step / args.steps, elapsed / (args.max_minutes * 60) if args.max_minutes else 0.0)
        ids, mask = next(stream)
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            tgt = target_batch(target, ids, mask, vocab_index, batch_taps)
        postfix = {}
        for n, student, optimizer in zip(sizes, students, optimizers):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, progress, args.lr, args.warmup)
            with autocast:
                loss, agree = student_loss(student, ids, mask, tgt, vocab_index, args.passes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            postfix[student_name(n)] = f"{loss.item():.3f}/" + ",".join(f"{a:.0%}" for a in agree)
        step += 1
        tokens_seen += int(mask.sum())
        train_seconds = time.perf_counter() - started
        bar.update(1)
        throughput = tokens_seen / (time.perf_counter() - session_started)
        bar.set_postfix(loss_agree=" ".join(f"{k}:{v}" for k, v in postfix.items()), tok_s=f"{throughput:.0f}")
        if step % args.save_every == 0:
            save(final=False)
    bar.close()
    for student in students:
        student.eval()
    held = []
    if held_out:
        held = held_out_metrics(target, students, held_out, vocab_index, args.batch_size, args.max_len, device, autocast,
                                args.passes, batch_taps)
    for n, metrics in zip(sizes, held):
        print(f"{student_name(n)} held-out ({len(held_out)} sequences): loss {metrics['loss']:.3f}, agreement "
              + " / ".join(f"{a:.1%}" for a in metrics["agree"]), file=sys.stderr)
    save(final=True, held_out=held)
    summary = {
        "artifacts": {n: str(artifact_dir(n)) for n in sizes}, "steps": step, "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(gen_seconds, 1), "sequences": len(dataset), "answer_tokens": answer_tokens,
        "draft_vocab_coverage": round(coverage, 5), "target_hash": target_hash,
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m specdec.<module> <subcommand> ... is the same as `specdec <subcommand> ...`
    from specdec.cli import main

    sys.exit(main())

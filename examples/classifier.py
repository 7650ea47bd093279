"""S5: a model-serving function at scale (the seed's BERT classifier), with a CPU-heavy stand-in model.

The seed served a BERT document classifier with funcX: every call loaded the model (cost C, about 3 s), then
classified its documents (r per item), so one call cost ``C + N*r``. Here the model loads **once per worker
process** (``@app.on_startup(scope="processes")``) and every later call only pays ``N*r``.

The stand-in model is real work, nothing fetched at run time: a kernel classifier over hashed word embeddings
(pure Python, one core). Loading embeds thousands of generated training documents and tunes the kernel on
held-out ones (a few seconds); classifying a document is a pass over every stored prototype (tens of ms).

The experiment: 250 documents split into ``p`` blocks for ``p = 1..10``; the ``p`` blocks are classified
concurrently (one task each) and the wall time and time per document are recorded. Worker processes
autoscale between 1 and ``--max-workers`` (the cores by default): while blocks wait, more processes start
(each loads the model once); after ``--idle-timeout`` seconds without work, they stop again.

    python examples/classifier.py                                  # in-process workers, memory broker
    python examples/classifier.py --docs 60 --max-blocks 4 --load-scale 0.2 --item-scale 0.2    # quick
    python examples/classifier.py --broker amqp://guest:guest@127.0.0.1:5672/
        # starts `taskstream worker examples.classifier:app --autoscale 1:MAX` and only submits from here
"""

from __future__ import annotations

import argparse
import math
import operator
import os
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskstream import App, Task, gather
from taskstream.tasks import WorkerConfig

QUEUE = os.environ.get("CLASSIFIER_QUEUE", "classifier")  # a worker process serves the queue main() tells it
LABELS = ("math", "physics", "computer science", "biology", "finance")
DIM = 32
BUCKETS = 4096
PROTOTYPES = 20000  # stored training documents at item_scale=1 (the per-document cost is one pass over them)
VALIDATION = 12  # held-out documents per bandwidth tried while loading, at load_scale=1
GAMMAS = (0.5, 1.0, 2.0)

VOCABULARY = {
    "math": "theorem proof lemma bound graph spectral prime algebra topology manifold integral conjecture",
    "physics": "energy gravity quantum field particle spin entropy thermodynamics photon relativity lattice",
    "computer science": "algorithm network compiler distributed latency scheduler learning database kernel cache",
    "biology": "protein cell gene sequence folding enzyme receptor tissue evolution neuron membrane",
    "finance": "market pricing option volatility portfolio risk asset credit interest equity hedge",
}
FILLER = [
    "we",
    "show",
    "that",
    "the",
    "a",
    "of",
    "in",
    "for",
    "with",
    "this",
    "paper",
    "results",
    "model",
    "method",
    "study",
    "new",
    "using",
    "based",
]


def make_document(label: str, rng: random.Random, words: int = 60) -> str:
    """A synthetic abstract: mostly filler words, some of its subject's vocabulary."""
    topic = VOCABULARY[label].split()
    return " ".join(rng.choice(topic) if rng.random() < 0.3 else rng.choice(FILLER) for _ in range(words))


class StandInModel:
    """A kernel classifier over hashed word embeddings: slow to load, slow per item, all of it real work.

    Loading embeds ``PROTOTYPES * item_scale`` training documents and then picks the kernel bandwidth that
    classifies ``VALIDATION * load_scale`` held-out documents best (each trial is a full pass over the
    prototypes per document). Classifying one document is one pass over every prototype.
    """

    def __init__(self, load_scale: float = 1.0, item_scale: float = 1.0, seed: int = 7) -> None:
        started = time.perf_counter()
        rng = random.Random(seed)
        self.embeddings = [[rng.gauss(0.0, 1.0) for _ in range(DIM)] for _ in range(BUCKETS)]
        self.gamma = GAMMAS[0]
        count = max(len(LABELS), round(PROTOTYPES * item_scale))
        self.prototypes: list[tuple[list[float], str]] = []
        for i in range(count):
            label = LABELS[i % len(LABELS)]
            self.prototypes.append((self.features(make_document(label, rng)), label))
        held_out = [LABELS[i % len(LABELS)] for i in range(max(1, round(VALIDATION * load_scale)))]
        validation = [(make_document(label, rng), label) for label in held_out]
        best = -1
        for gamma in GAMMAS:
            self.gamma = gamma
            hits = sum(self.predict(doc) == label for doc, label in validation)
            if hits > best:
                best, chosen = hits, gamma
        self.gamma = chosen
        self.load_seconds = time.perf_counter() - started
        self.loaded_at = time.time()
        self.pid = os.getpid()

    def features(self, text: str) -> list[float]:
        """The normalised sum of the words' hashed embeddings."""
        vector = [0.0] * DIM
        for word in text.split():
            row = self.embeddings[zlib.crc32(word.encode()) % BUCKETS]
            vector = list(map(operator.add, vector, row))
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def predict(self, text: str) -> str:
        """Kernel vote of every prototype: ``exp(gamma * cosine)`` per prototype, summed per label."""
        features = self.features(text)
        votes = dict.fromkeys(LABELS, 0.0)
        gamma, exp = self.gamma, math.exp
        for vector, label in self.prototypes:
            votes[label] += exp(gamma * sum(map(operator.mul, features, vector)))
        return max(votes, key=lambda label: votes[label])


app = App()  # TASKSTREAM_BROKER_URL, the embedded memory broker by default
MODEL: StandInModel | None = None


@app.on_startup(scope="processes")
def load_model() -> None:
    """Runs once in each worker process, before it takes work: the model is loaded once per worker."""
    global MODEL
    MODEL = StandInModel(
        load_scale=float(os.environ.get("CLASSIFIER_LOAD_SCALE", "1")),
        item_scale=float(os.environ.get("CLASSIFIER_ITEM_SCALE", "1")),
    )


@app.task(queue=QUEUE, cpu_bound=True)
def classify_block(documents: list[str]) -> dict[str, Any]:
    """Classify a block of documents with this worker's model."""
    assert MODEL is not None, "the startup hook did not run in this worker process"
    return {
        "labels": [MODEL.predict(doc) for doc in documents],
        "pid": MODEL.pid,
        "loaded_at": MODEL.loaded_at,
        "load_seconds": MODEL.load_seconds,
    }


@dataclass
class Row:
    """One ``p``: its wall time and what the workers reported."""

    blocks: int
    seconds: float
    per_item: float
    workers: int
    loads_so_far: int


@dataclass
class Report:
    """What one run measured."""

    docs: int
    max_workers: int
    rows: list[Row] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    calls: int = 0
    loads: int = 0
    pool_after_idle: int | None = None

    def table(self) -> str:
        r = self.rows[0].per_item if self.rows else 0.0
        c = min(self.load_seconds, default=0.0)
        spread = f"{c:.2f}-{max(self.load_seconds, default=0.0):.2f} s across workers, loading while others work"
        lines = [
            f"{self.docs} documents, p blocks classified concurrently, workers autoscaled 1..{self.max_workers}",
            f"model load C = {c:.2f} s once per worker ({spread}); r ~ {r * 1000:.1f} ms per document (p=1)",
            f"{'p':>3} {'wall s':>8} {'s/doc':>8} {'workers':>8} {'loads':>6} {'funcX-style C per call':>24}",
        ]
        for row in self.rows:
            rounds = math.ceil(row.blocks / self.max_workers)
            funcx = rounds * (c + self.docs / row.blocks * r)
            lines.append(
                f"{row.blocks:>3} {row.seconds:>8.2f} {row.per_item:>8.4f} {row.workers:>8} {row.loads_so_far:>6}"
                f" {funcx:>22.2f} s"
            )
        lines.append(
            f"{self.calls} calls, {self.loads} model loads (funcX would have loaded {self.calls} times); "
            f"accuracy {self.accuracy:.0%}"
        )
        if self.pool_after_idle is not None:
            lines.append(f"after the idle timeout the pool shrank to {self.pool_after_idle} worker process(es)")
        return "\n".join(lines)


def run(task: Task[Any, Any], documents: list[str], truth: list[str], max_blocks: int, report: Report) -> None:
    """For p = 1..max_blocks: split the documents into p blocks, classify them concurrently, time it."""
    warm = gather(task.map([documents[:1]]), progress=False).result(timeout=600)  # the first worker is ready
    models: dict[tuple[int, float], float] = {(r["pid"], r["loaded_at"]): r["load_seconds"] for r in warm}
    correct = total = 0
    for p in range(1, max_blocks + 1):
        size = math.ceil(len(documents) / p)
        blocks = [documents[i : i + size] for i in range(0, len(documents), size)]
        started = time.perf_counter()
        results = gather(task.map(blocks), progress=False).result(timeout=600)
        seconds = time.perf_counter() - started
        report.calls += len(blocks)
        used = {r["pid"] for r in results}
        models.update({(r["pid"], r["loaded_at"]): r["load_seconds"] for r in results})
        labels = [label for r in results for label in r["labels"]]
        correct += sum(a == b for a, b in zip(labels, truth, strict=True))
        total += len(truth)
        report.rows.append(Row(p, seconds, seconds / len(documents), len(used), len(models)))
    report.loads = len(models)
    report.load_seconds = sorted(models.values())
    report.accuracy = correct / total if total else 0.0


def _start_worker(broker: str, max_workers: int, idle_timeout: float, queue: str) -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TASKSTREAM_BROKER_URL=broker, CLASSIFIER_QUEUE=queue)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "taskstream.cli", "worker", "examples.classifier:app", "--queues", queue]
    options = ["--autoscale", f"1:{max_workers}", "--idle-timeout", str(idle_timeout)]
    return subprocess.Popen([*command, *options], env=env, cwd=root)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=250, help="documents to classify (250)")
    parser.add_argument("--max-blocks", type=int, default=10, help="largest p (10)")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1, help="autoscale cap (cores)")
    parser.add_argument("--idle-timeout", type=float, default=3.0, help="seconds before an idle worker stops")
    parser.add_argument("--load-scale", type=float, default=1.0, help="model tuning cost (scales C)")
    parser.add_argument("--item-scale", type=float, default=1.0, help="prototypes (scales r, and C a little)")
    parser.add_argument("--broker", default=None, help="a real broker URL: a worker process is started for it")
    parser.add_argument("--queue", default=QUEUE, help=f"the task queue on that broker ({QUEUE})")
    args = parser.parse_args(argv)
    os.environ["CLASSIFIER_LOAD_SCALE"] = str(args.load_scale)  # worker processes take it at their start
    os.environ["CLASSIFIER_ITEM_SCALE"] = str(args.item_scale)
    rng = random.Random(2021)
    truth = [LABELS[rng.randrange(len(LABELS))] for _ in range(args.docs)]
    documents = [make_document(label, rng) for label in truth]
    report = Report(args.docs, args.max_workers)

    if args.broker:
        worker = _start_worker(args.broker, args.max_workers, args.idle_timeout, args.queue)
        try:
            with App(args.broker, workers=False) as client:
                run(client.remote("classify_block", queue=args.queue), documents, truth, args.max_blocks, report)
        finally:
            worker.terminate()
            worker.wait(60)
    else:
        app.tasks.enable_worker(
            WorkerConfig(min_processes=1, max_processes=args.max_workers, idle_timeout=args.idle_timeout)
        )
        with app:
            worker_pool = app.tasks.worker.pool if app.tasks.worker else None
            run(classify_block, documents, truth, args.max_blocks, report)
            if worker_pool is not None:
                deadline = time.monotonic() + args.idle_timeout + 10
                while worker_pool.size > worker_pool.min_size and time.monotonic() < deadline:
                    time.sleep(0.1)
                report.pool_after_idle = worker_pool.size
    print(report.table())
    return report


if __name__ == "__main__":
    main()

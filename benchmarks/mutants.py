"""A hand-made sample of small plausible bugs ("mutants"), each run against the test files that
target its module: a mutant is *killed* when those tests fail on it. Prints one row per mutant
and the kill rate. A full mutation-tool run over the whole suite is not practical on a laptop;
this is the sample the issue-27 work measured (docs/evaluation.md#how-the-metrics-are-tested).

    python benchmarks/mutants.py                 # every mutant
    python benchmarks/mutants.py hycd_scale m3   # the mutants whose name contains a word given
    python benchmarks/mutants.py hycd --tests tests/methods/test_clip_refine.py -k scale  # other tests

Each mutant is one exact text replacement in one file (the text must occur exactly once); the
file is restored after its run, also on Ctrl-C. Run it on a clean work tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, ``file::test`` ids, ``-k`` expressions


MUTANTS = [
    # ---- the five bugs issue 27 found passing the suite
    Mutant("hycd_scale", "clipft/methods/clip_refine.py",
           "teacher_logit_scale=self.teacher.logit_scale.exp() if scaled",
           "teacher_logit_scale=self.logit_scale if scaled", ("tests/methods/test_clip_refine.py",)),
    Mutant("m3_vv_lambda", "clipft/methods/mixup.py",
           'unimodal_mixup_loss("image", image, text, lam["vv"]', 'unimodal_mixup_loss("image", image, text, lam["ll"]',
           ("tests/methods/test_mixup.py",)),
    Mutant("recall_clip_gallery", "clipft/eval/metrics.py",
           "(i2t_counts < min(k, n_texts))", "(i2t_counts < min(k, n_images))", ("tests/eval",)),
    Mutant("recall_clip_gallery_t2i", "clipft/eval/metrics.py",
           "(t2i_counts < min(k, n_images))", "(t2i_counts < min(k, n_texts))", ("tests/eval",)),
    Mutant("train_gap_unnormalised", "clipft/methods/base.py",
           "image_unit, text_unit = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)",
           "image_unit, text_unit = image_features, text_features", ("tests/methods",)),
    Mutant("zeroshot_mode_ignored", "clipft/eval/metrics.py",
           'if ensemble == "mean":\n        class_embeddings', 'if True:\n        class_embeddings', ("tests/eval",)),
    Mutant("separability_leak", "clipft/eval/gap.py",
           "train = order[~torch.isin(order, part)]", "train = order", ("tests/eval",)),
]


def run(mutant: Mutant, timeout: int, tests: tuple[str, ...] = ()) -> tuple[bool, float]:
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to replace occurs {original.count(mutant.old)} times in {mutant.path}")
    start = time.time()
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     *(tests or mutant.tests)], cwd=ROOT, env=env, capture_output=True, timeout=timeout)
            killed = result.returncode != 0
        except subprocess.TimeoutExpired:
            killed = True  # a mutant that hangs the tests is noticed
    finally:
        path.write_text(original)
    return killed, time.time() - start


def main(argv: list[str]) -> int:
    tests: tuple[str, ...] = ()
    if "--tests" in argv:  # run these pytest arguments instead of each mutant's own
        tests = tuple(argv[argv.index("--tests") + 1 :])
        argv = argv[: argv.index("--tests")]
    chosen = [m for m in MUTANTS if not argv or any(word in m.name for word in argv)]
    killed = 0
    print("| mutant | file | killed | seconds |\n|---|---|---|---|", flush=True)
    for mutant in chosen:
        dead, seconds = run(mutant, timeout=900, tests=tests)
        killed += dead
        print(f"| {mutant.name} | {mutant.path} | {'yes' if dead else '**no**'} | {seconds:.0f} |", flush=True)
    print(f"\nkilled {killed} of {len(chosen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

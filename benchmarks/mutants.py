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
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


# The end-to-end preset runs (minutes each on 2 cores) are left out of the targeted tests.
SKIP = "not short_run"


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, ``file::test`` ids, ``-k`` expressions


LOSSES, METHODS, EVAL = "tests/losses/test_", "tests/methods/test_", ("tests/eval",)

MUTANTS = [
    # ---- the five bugs issue 27 found passing the suite, and two of the same kinds
    Mutant("hycd_scale", "clipft/methods/clip_refine.py",
           "teacher_logit_scale=self.teacher.logit_scale.exp() if scaled",
           "teacher_logit_scale=self.logit_scale if scaled", (METHODS + "clip_refine.py",)),
    Mutant("m3_vv_lambda", "clipft/methods/mixup.py",
           'unimodal_mixup_loss("image", image, text, lam["vv"]', 'unimodal_mixup_loss("image", image, text, lam["ll"]',
           (METHODS + "mixup.py",)),
    Mutant("recall_clip_gallery", "clipft/eval/metrics.py",
           "(i2t_counts < min(k, n_texts))", "(i2t_counts < min(k, n_images))", EVAL),
    Mutant("recall_clip_gallery_t2i", "clipft/eval/metrics.py",
           "(t2i_counts < min(k, n_images))", "(t2i_counts < min(k, n_texts))", EVAL),
    Mutant("train_gap_unnormalised", "clipft/methods/base.py",
           "image_unit, text_unit = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)",
           "image_unit, text_unit = image_features, text_features", (METHODS + "base.py",)),
    Mutant("separability_leak", "clipft/eval/gap.py",
           "train = order[~torch.isin(order, part)]", "train = order", EVAL),
    Mutant("zeroshot_mode_ignored", "clipft/eval/metrics.py",
           'if ensemble == "mean":\n        class_embeddings', 'if True:\n        class_embeddings', EVAL),
    # ---- losses
    Mutant("clip_logits_gallery_swapped", "clipft/losses/contrastive.py",
           "logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T",
           "logit_scale * image_features @ all_image.T, logit_scale * text_features @ all_text.T",
           (LOSSES + "contrastive.py",)),
    Mutant("siglip_offset_dropped", "clipft/losses/contrastive.py",
           "signs[rows, rows + offset] = 1.0", "signs[rows, rows] = 1.0", (LOSSES + "contrastive.py",)),
    Mutant("siglip_mean_not_sum", "clipft/losses/contrastive.py",
           "-F.logsigmoid(signs * logits).sum() / image_features.shape[0]", "-F.logsigmoid(signs * logits).mean()",
           (LOSSES + "contrastive.py",)),
    Mutant("negclip_mask_inverted", "clipft/losses/hard_negatives.py",
           "masked_fill(~all_valid.reshape(1, -1)", "masked_fill(all_valid.reshape(1, -1)", (LOSSES + "hard_negatives.py",)),
    Mutant("negclip_t2i_gallery", "clipft/losses/hard_negatives.py",
           "logit_scale * text_features @ all_image.T", "logit_scale * text_features @ all_text.T",
           (LOSSES + "hard_negatives.py",)),
    Mutant("distill_world_dropped", "clipft/losses/hard_negatives.py",
           "return total * world_size", "return total", (LOSSES + "hard_negatives.py",)),
    Mutant("slerp_lambda_flipped", "clipft/losses/mixup.py",
           "(torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b)",
           "(torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b)", (LOSSES + "geodesic_mixup.py",)),
    Mutant("partner_target_overwrites", "clipft/losses/mixup.py",
           "total - 1 - rows] += partner", "total - 1 - rows] = partner", (LOSSES + "geodesic_mixup.py",)),
    Mutant("unimodal_backward_gallery", "clipft/losses/mixup.py",
           "scale * other_local @ mixed_all.T", "scale * other_local @ other_all.T", (LOSSES + "geodesic_mixup.py",)),
    Mutant("rafa_code_halved", "clipft/losses/refine.py",
           "return image_sq.mean() + text_sq.mean()", "return (image_sq.mean() + text_sq.mean()) / 2",
           (LOSSES + "refine.py",)),
    Mutant("hycd_softmax_dim", "clipft/losses/refine.py",
           "F.softmax(teacher_logits / temperature, dim=1)", "F.softmax(teacher_logits / temperature, dim=0)",
           (LOSSES + "refine.py",)),
    Mutant("hycd_temperature_squared", "clipft/losses/refine.py",
           "kl.sum(dim=1).mean() * temperature**2", "kl.sum(dim=1).mean() * temperature", (LOSSES + "refine.py",)),
    Mutant("mmrl_representation_logits", "clipft/losses/representation.py",
           '"representation": F.cross_entropy(representation_logits, labels)',
           '"representation": F.cross_entropy(class_logits, labels)', (METHODS + "mmrl.py",)),
    # ---- methods
    Mutant("degla_tgc_teacher_image", "clipft/methods/degla.py",
           'text_grounded_contrast(text, features["teacher_text"]', 'text_grounded_contrast(text, features["teacher_image"]',
           (METHODS + "degla.py",)),
    Mutant("mixup_decay_off_by_one", "clipft/methods/mixup.py",
           "1.0 / (self.current_epoch + 1)", "1.0 / (self.current_epoch + 2)", (METHODS + "mixup.py",)),
    Mutant("warmup_off_by_one", "clipft/methods/base.py",
           "return (step + 1) / warmup", "return step / warmup", (METHODS + "base.py",)),
    Mutant("no_decay_on_matrices", "clipft/methods/base.py",
           "param.ndim < 2\n", "param.ndim < 3\n", (METHODS + "base.py",)),
    # ---- evaluation
    Mutant("uniformity_pair_count", "clipft/eval/gap.py",
           "math.log(n * (n - 1) / 2)", "math.log(n * n / 2)", EVAL),
    Mutant("relative_alignment_sign", "clipft/eval/gap.py",
           'terms.append(own - d2.masked_fill(same, float("inf")).min(dim=1).values)',
           'terms.append(d2.masked_fill(same, float("inf")).min(dim=1).values - own)', EVAL),
    Mutant("centroid_mse_wrong_dim", "clipft/eval/gap.py",
           "delta.square().sum() / image.shape[1]", "delta.square().sum() / image.shape[0]", EVAL),
    Mutant("compositional_tie_counts", "clipft/eval/compositional.py", "pos > neg", "pos >= neg", EVAL),
    Mutant("zeroshot_mean_not_renormalised", "clipft/eval/metrics.py",
           "F.normalize(class_text_features.mean(dim=1), dim=-1)", "class_text_features.mean(dim=1)", EVAL),
    # ---- export
    Mutant("wise_ft_alpha_swapped", "clipft/export.py",
           "(1 - alpha) * start[k].double() + alpha * v.double()", "alpha * start[k].double() + (1 - alpha) * v.double()",
           ("tests/test_export.py",)),
]


def run(mutant: Mutant, timeout: int, tests: tuple[str, ...] = ()) -> tuple[Optional[bool], float, str]:
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        print(f"| {mutant.name} | {mutant.path} | skipped: the text occurs {original.count(mutant.old)} times | | |")
        return None, 0.0, ""
    start = time.time()
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     *(tests or (*mutant.tests, "-k", SKIP))], cwd=ROOT, env=env, capture_output=True, timeout=timeout)
            killed = result.returncode != 0
            failed = [line.split(" ")[1] for line in result.stdout.decode().splitlines() if line.startswith(("FAILED", "ERROR"))]
            by = failed[0].split("::")[-1] if failed else ("" if not killed else f"pytest exit {result.returncode}")
        except subprocess.TimeoutExpired:
            killed, by = True, "timeout"  # a mutant that hangs the tests is noticed
    finally:
        path.write_text(original)
    return killed, time.time() - start, by


def main(argv: list[str]) -> int:
    tests: tuple[str, ...] = ()
    if "--tests" in argv:  # run these pytest arguments instead of each mutant's own
        tests = tuple(argv[argv.index("--tests") + 1 :])
        argv = argv[: argv.index("--tests")]
    chosen = [m for m in MUTANTS if not argv or any(word in m.name for word in argv)]
    killed = 0
    print("| mutant | file | killed | by | seconds |\n|---|---|---|---|---|", flush=True)
    ran = 0
    for mutant in chosen:
        dead, seconds, by = run(mutant, timeout=900, tests=tests)
        if dead is None:
            continue
        ran += 1
        killed += dead
        print(f"| {mutant.name} | {mutant.path} | {'yes' if dead else '**no**'} | {by} | {seconds:.0f} |", flush=True)
    print(f"\nkilled {killed} of {ran}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

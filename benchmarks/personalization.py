"""DreamBooth on digits: teach the FP digits model a new subject from 5 images, with each method.

The subject is five left-right mirrored 3s under the reserved class id 11 (see
:mod:`diffquant.bench.personalize`), trained with prior preservation. For every method: subject
fidelity (classifier-feature cosine similarity of 50 generated subject samples to the 5 images, and
relative to FP full fine-tuning), prompt fidelity (class accuracy of 200 samples of the ordinary
digits), training wall time and peak training memory (RSS above the level at the start of training),
all measured in this one run. Writes ``personalization.json`` and ``personalization.png`` (first row:
the subject images; then one row of subject samples per method).

Usage: python benchmarks/personalization.py [--out out/bench] [--steps 300] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffquant.bench.digits.cache import fp_scheduler, load_or_train_classifier, load_or_train_fp_model
from diffquant.bench.digits.data import load_digits_dataset, train_test_split
from diffquant.bench.digits.sampling import save_sample_grid
from diffquant.bench.personalize import (
    PERSONALIZATION_METHODS,
    PersonalizeConfig,
    evaluate_personalization,
    mirrored_digits,
    personalize,
    subject_fidelity,
    subject_images,
    training_set,
)
from diffquant.io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--methods", nargs="+", default=list(PERSONALIZATION_METHODS), choices=list(PERSONALIZATION_METHODS)
    )
    parser.add_argument("--no-prior", action="store_true", help="train without prior preservation")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="60 steps, fewer samples (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    fp_model = load_or_train_fp_model(cache_dir=args.cache_dir)
    classifier = load_or_train_classifier(cache_dir=args.cache_dir)
    train, test = train_test_split(load_digits_dataset())
    subject = subject_images(train)
    config = PersonalizeConfig(steps=60 if args.quick else args.steps, prior_preservation=not args.no_prior)
    samples = {"num_subject_samples": 20, "per_class": 5} if args.quick else {}
    images, labels = training_set(fp_model, subject, config)

    references = {
        "unseen_subject_images": subject_fidelity(classifier, mirrored_digits(test), subject),
        "ordinary_3s": subject_fidelity(classifier, test.images[test.labels == 3], subject),
    }
    before = evaluate_personalization(fp_model, classifier, subject, **samples)
    references["fp_model_before_finetuning"] = before["subject_fidelity"]
    rows, grid_rows = [], [subject]
    for method in args.methods:
        result = personalize(fp_model, method, images, labels, fp_scheduler(), config)
        metrics = evaluate_personalization(result.model, classifier, subject, **samples)
        grid_rows.append(metrics.pop("subject_samples")[:10])
        rows.append(
            {
                "method": method,
                **metrics,
                "train_seconds": result.seconds,
                "peak_bytes": result.peak_bytes,
                "trainable_params": result.trainable_params,
                "final_loss": sum(result.losses[-20:]) / len(result.losses[-20:]),
            }
        )
        print(
            f"{method:14s} subject {metrics['subject_fidelity']:.3f} prompt {metrics['prompt_fidelity']:.3f} "
            f"{result.seconds:.0f} s {result.peak_bytes / 2**20:.0f} MiB",
            flush=True,
        )
    fp = next((r for r in rows if r["method"] == "fp-full"), None)
    for row in rows:
        row["subject_vs_fp_full"] = row["subject_fidelity"] / fp["subject_fidelity"] if fp else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_labels = torch.cat([torch.full((g.shape[0],), i) for i, g in enumerate(grid_rows)])
    save_sample_grid(torch.cat(grid_rows), grid_labels, out / "personalization.png")
    result = {
        "quick": args.quick,
        "config": config.__dict__,
        "subject": "5 left-right mirrored 3s, class id 11",
        "references": references,
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    atomic_write_text(out / "personalization.json", json.dumps(result, indent=2))
    print(f"wrote {out / 'personalization.json'} and personalization.png")


if __name__ == "__main__":
    main()

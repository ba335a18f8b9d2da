"""Empirical privacy audit (one training run, Steinke, Nasr and Jagielski 2023) of the private trainer.

    python bench/privacy_audit.py --threads 1                       # 256 canaries, 600 steps, eps 1 2 4 8 + no DP
    python bench/privacy_audit.py --canaries 64 --steps 150 --epsilons 2

Each run trains a segmenter (seg-only, 16 px) on a site made only of canary patients whose masks were
chosen by secret coins (``genseg_fed.privacy.audit``), then guesses every coin from the trained model and
reports the epsilon lower bound (95 % confidence, delta 1e-5) next to the epsilon the run reports. A
non-private run must reach a lower bound above the claims it is compared with; a DP run must stay
below its reported epsilon. Writes ``<out>/privacy_audit.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from bench.common import machine_info, setup_runtime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canaries", type=int, default=256)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the non-private run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/privacy_audit"))
    args = ap.parse_args(argv)
    setup_runtime(args.threads)
    from genseg_fed.privacy.audit import run_canary_audit

    runs = ([None] if args.baseline else []) + list(args.epsilons)
    rows = []
    for eps in runs:
        started = time.perf_counter()
        row = run_canary_audit(
            epsilon=eps, canaries=args.canaries, steps=args.steps, batch_size=args.batch_size, seed=args.seed
        )
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(
            f"epsilon {eps}: {row['correct']}/{row['guesses']} correct, lower bound {row['epsilon_lower']:.2f}"
        )
    print()
    print("| training | reported epsilon | correct guesses | epsilon lower bound (95 %) | consistent |")
    print("|---|---|---|---|---|")
    for row in rows:
        target = row["epsilon_target"]
        name = "no DP" if target is None else f"DP, target {target:g}"
        reported = row["epsilon_reported"]
        ok = "–" if math.isinf(reported) else ("yes" if row["epsilon_lower"] <= reported else "NO")
        rep = "inf" if math.isinf(reported) else f"{reported:.2f}"
        print(f"| {name} | {rep} | {row['correct']} / {row['guesses']} | {row['epsilon_lower']:.2f} | {ok} |")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python bench/privacy_audit.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(args.threads),
    }
    (args.out / "privacy_audit.json").write_text(
        json.dumps({"meta": meta, "runs": rows}, indent=2, default=str)
    )


if __name__ == "__main__":
    main()

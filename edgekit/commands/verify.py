from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("verify", help="re-check an artifact against the reference it ships with (no torch)",
                       description="Check the artifact's file hashes, load it in its runtime and compare its "
                       "outputs with the PyTorch reference stored in it. Exit 3 when the gate fails.")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    from edgekit.errors import GateFailed
    from edgekit.ui import print_json
    from edgekit.verify import check_against_reference

    res = check_against_reference(a.artifact)
    if a.json:
        print_json(res)
    else:
        print(f"{a.artifact}: gate {'passed' if res['passed'] else 'FAILED'}: max |dlogit| "
              f"{res['max_abs_logit_delta']:.3g}, top-1 {res['top1_agreement']:.3f}, KL {res['mean_kl']:.3g}, "
              f"greedy {'identical' if res['greedy_match'] else 'differs'}")
    if not res["passed"]:
        raise GateFailed(f"gate failed: {'; '.join(res['failures'])}", "re-export the artifact")
    return 0

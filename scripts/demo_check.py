#!/usr/bin/env python
"""The demo model's grammar check: what each video of a `generate` run shows, against its prompt.

Each video's mp4 is read back (`models/demo/grammar.py`: the dominant non-background colour and
the shape's motion) and compared with the caption its prompt states. Exit 0 when colour and
motion accuracy reach --min-colour / --min-motion, 1 when not (2 for bad input).

    python scripts/demo_check.py --write-prompts prompts.txt       # the check's 20 prompts
    python -m launcher generate --preset hunyuan-video-demo --prompts-file prompts.txt --seed 0 --output-dir run
    python scripts/demo_check.py run [--reference exact-run]         # + PSNR against another run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.quality import compare, json_safe, run_videos  # noqa: E402
from launcher.video import read_video_frames  # noqa: E402
from models.demo import grammar  # noqa: E402


def check_run(run: Path) -> list[dict]:
    rows = []
    for stem, (prompt, path) in run_videos(run).items():
        want, got = grammar.parse(prompt), grammar.read_back(read_video_frames(path))
        held = (want.colour, want.shape, want.motion) in set(grammar.HELD_OUT)
        rows.append({"stem": stem, "prompt": prompt, "held_out": held, "colour": got.colour, "motion": got.motion,
                     "colour_ok": got.colour == want.colour, "motion_ok": got.motion == want.motion,
                     "dx": round(got.dx, 1), "dy": round(got.dy, 1), "growth": round(got.growth, 2)})
    return rows


def accuracy(rows: list[dict]) -> dict:
    n = len(rows)
    held = [r for r in rows if r["held_out"]]
    out = {"videos": n, "colour": sum(r["colour_ok"] for r in rows) / n, "motion": sum(r["motion_ok"] for r in rows) / n}
    if held:
        out["held_out"] = {"videos": len(held), "colour": sum(r["colour_ok"] for r in held) / len(held),
                           "motion": sum(r["motion_ok"] for r in held) / len(held)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, nargs="?", help="a generate output directory of demo-model videos")
    p.add_argument("--reference", type=Path, help="a run of the same prompts and seeds: PSNR against it too")
    p.add_argument("--write-prompts", type=Path, help="write the check's prompts (one per line) and exit")
    p.add_argument("--count", type=int, default=20, help="prompts to write (the held-out ones first)")
    p.add_argument("--min-colour", type=float, default=0.9)
    p.add_argument("--min-motion", type=float, default=0.8)
    p.add_argument("--json", type=Path, help="also write rows and accuracy here")
    args = p.parse_args(argv)
    if args.write_prompts is not None:
        args.write_prompts.write_text("".join(c.text + "\n" for c in grammar.check_prompts(args.count)))
        return 0
    if args.run is None:
        p.error("give a run directory, or --write-prompts FILE")
    try:
        rows = check_run(args.run)
        psnr = {r.stem: r.psnr_db for r in compare(args.run, args.reference)} if args.reference else {}
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        r["psnr_db"] = psnr.get(r["stem"])
        mark = lambda ok: "ok" if ok else "WRONG"  # noqa: E731
        extra = f"  PSNR {r['psnr_db']:.2f} dB" if r["psnr_db"] is not None else ""
        print(f"{r['prompt']:<30} {'held-out' if r['held_out'] else 'seen':<8} colour {r['colour']} "
              f"{mark(r['colour_ok'])}, motion {r['motion']} {mark(r['motion_ok'])}{extra}")
    acc = accuracy(rows)
    print(f"colour {acc['colour']:.0%}, motion {acc['motion']:.0%} of {acc['videos']} videos"
          + (f" (held-out: colour {acc['held_out']['colour']:.0%}, motion {acc['held_out']['motion']:.0%})"
             if "held_out" in acc else ""))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [json_safe(r) for r in rows], "accuracy": acc}, indent=2) + "\n")
    return 0 if acc["colour"] >= args.min_colour and acc["motion"] >= args.min_motion else 1


if __name__ == "__main__":
    sys.exit(main())

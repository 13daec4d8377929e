"""``python -m ambert.report [--quick] [--out build/report] [--only SECTION,...]``: measure every section on
this machine and write the page, its tables and figures. Exit status 0 when every section was measured,
1 when one failed (the page still says which, and why)."""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .context import ROOT, Context, Settings
from .measure import cpu_int8_features
from .page import Report, Section
from .sections import SECTIONS


def machine():
    import onnxruntime
    import torch
    model, features = cpu_int8_features()
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 0
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "not a git checkout"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    return {"cpu": model, "int8_features": ", ".join(features) or "none", "cores": os.cpu_count(),
            "memory_gib": pages / 2**30, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "commit": commit,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def main(argv=None):
    keys = [k for k, _, _ in SECTIONS]
    p = argparse.ArgumentParser(prog="python -m ambert.report", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="every section on fewer sentences, repetitions and ranks (minutes, for CI)")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "report", help="folder to write (default: %(default)s)")
    p.add_argument("--only", help=f"comma-separated sections to run (of {', '.join(keys)}); quantization "
                                  "always runs, the others need its model")
    args = p.parse_args(argv)
    only = set(keys) if not args.only else {"quantization", *args.only.split(",")}
    unknown = only - set(keys)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(keys)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tqdm import tqdm

    settings = Settings.quick() if args.quick else Settings()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()                              # figures of an earlier run must not pass for this one's
    command = "make report" + (" QUICK=1" if args.quick else "")
    report = Report(machine=machine(), command=command, quick=args.quick)
    ctx = Context(settings, out=args.out)
    failed = []
    chosen = [s for s in SECTIONS if s[0] in only]
    with tqdm(total=len(chosen), desc="report", unit="section", file=sys.stderr) as bar:
        try:
            ctx.load()
        except Exception as e:              # noqa: BLE001 - one line, not a traceback
            ctx.close()
            print(f"error: cannot load the bundled model and sentences: {e}", file=sys.stderr)
            return 2
        for key, title, run in chosen:
            sec = Section(key, title)
            bar.set_description(title.split(":")[0])
            t0 = time.perf_counter()
            try:
                report.headline.update(run(ctx, sec, lambda what: bar.set_postfix_str(what, refresh=True)) or {})
            except Exception as e:          # noqa: BLE001 - the page says what failed; the other sections go on
                failed.append(key)
                sec.absent.append(f"this section failed: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stderr) if os.environ.get("AMBERT_DEBUG") else None
            sec.seconds = time.perf_counter() - t0
            report.sections.append(sec)
            bar.update()
    ctx.close()
    report.write(args.out)
    print(f"wrote {args.out / 'index.html'} (and report.md, report.json, {len(list(args.out.glob('*.png')))} figures)")
    if failed:
        print(f"sections that failed: {', '.join(failed)} (the page says why; AMBERT_DEBUG=1 prints the traceback)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

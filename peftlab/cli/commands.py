"""The small commands: ``peftlab info`` (what is bundled), ``export`` (a run as a script), ``bench``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from typing import Any

from peftlab.cli.exits import EXIT_OK
from peftlab.errors import ConfigError
from peftlab.provenance import jsonable


def cmd_info(args: argparse.Namespace) -> int:
    """``peftlab info``: the bundled models, datasets, methods and tasks, as text or JSON."""
    import peftlab

    sections = {
        "models": [_as_dict(m) for m in peftlab.list_models()],
        "datasets": [_as_dict(d) for d in peftlab.list_datasets()],
        "methods": [_as_dict(m) for m in peftlab.list_methods()],
        "tasks": [{"name": t.name, "description": f"({t.framing}) {t.description}", "framing": t.framing,
                   "model": t.model, "metrics": ", ".join(t.metrics)} for t in peftlab.list_tasks()],
    }
    if args.json:
        print(json.dumps(jsonable(sections), indent=1))
        return EXIT_OK
    print(f"peftlab {peftlab.__version__}")
    for title, items in sections.items():
        print(f"\n{title} ({len(items)}):" if not args.brief else f"{title}:")
        width = max((len(str(it.get("name", ""))) for it in items), default=0)
        for item in items:
            name = str(item.get("name", "?"))
            if args.brief:
                print(f"  {name:<{width}}  {_shorten(str(item.get('description', '')), 70)}")
            else:
                print(f"  {name:<{width}}  {item.get('description', '')}")
                details = {k: v for k, v in item.items()
                           if k not in ("name", "description") and v is not None}
                for key, value in details.items():
                    print(f"  {'':<{width}}    {key}: {_format_value(value)}")
    return EXIT_OK


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if hasattr(item, "as_dict"):
        return item.as_dict()
    if dataclasses.is_dataclass(item):
        return dataclasses.asdict(item)
    return {"name": str(item)}


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def cmd_export(args: argparse.Namespace) -> int:
    """Write the run as a script (peftlab.export) and say how to launch it."""
    from peftlab.export import export_script

    path = export_script(args.run_dir, args.to)
    print(f"wrote {path}\n  run it:  python {path}\n  or:      accelerate launch {path}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """``bench spectra`` times factor-based spectra; ``bench train`` (and any other) goes to
    ``peftlab.bench.main(args)``, which gets ``args.what`` and ``args.options`` (the words after
    WHAT) and returns an exit status."""
    if args.what == "spectra":
        return bench_spectra(args.options)
    if args.what == "learn":
        from peftlab import bench_learn

        return bench_learn.main(args)
    if args.what == "serve":
        from peftlab import bench_serve

        return bench_serve.main(args)
    if args.what == "deploy":
        from peftlab import bench_deploy

        return bench_deploy.main(args)
    if importlib.util.find_spec("peftlab.bench") is None:
        raise ConfigError(
            f"`peftlab bench {args.what}` needs the module peftlab.bench, which this installation "
            "lacks. Expected a complete peftlab install; try `peftlab bench spectra`, or reinstall."
        )
    from peftlab import bench

    status = bench.main(args)
    return EXIT_OK if status is None else int(status)


def bench_spectra(options: list[str]) -> int:
    """``peftlab bench spectra [options]``: time factor-based spectra against a full SVD."""
    from peftlab.spectra import bench_spectra as run, format_bench_spectra

    p = argparse.ArgumentParser(prog="peftlab bench spectra",
                                description="Time factor-based singular values against a full SVD.")
    p.add_argument("--sizes", default="1024,2048,4096", help="d of the d x d updates (default: 1024,2048,4096)")
    p.add_argument("--ranks", default="8,16,64", help="ranks r (default: 8,16,64)")
    p.add_argument("--repeats", type=int, default=5, help="timings of the factored route; best kept")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    opts = p.parse_args(options)
    try:
        sizes = [int(x) for x in opts.sizes.split(",")]
        ranks = [int(x) for x in opts.ranks.split(",")]
    except ValueError as err:
        raise ConfigError(f"--sizes/--ranks must be comma-separated integers ({err}). "
                          "Expected e.g. --sizes 512,1024 --ranks 8,16.") from None
    rows = run(sizes=sizes, ranks=ranks, repeats=opts.repeats)
    print(json.dumps(rows, indent=1) if opts.json else format_bench_spectra(rows))
    return EXIT_OK

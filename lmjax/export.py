"""python -m lmjax.export --workdir W --out DIR [--step N] [--overwrite]

Writes DIR/model.safetensors (every parameter as one full array, named by its path joined with
'.') and DIR/params.json (model config, step, run config); load them back, on any machine and
without a mesh, with `lmjax.interop.consolidated.load_consolidated(DIR)`.
"""
import argparse
import sys

from lmjax.xla_flags import tune_xla_cpu_flags


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lmjax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training run folder")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and params.json into")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tune_xla_cpu_flags()
    from absl import logging

    from lmjax.interop.consolidated import MODEL_FILE, PARAMS_FILE, export_run, read_params_json
    from lmjax.registry import ConfigError

    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    try:
        out = export_run(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
    except (ValueError, ConfigError, FileNotFoundError) as error:
        print(f"lmjax.export: error: {error}", file=sys.stderr)
        return 2
    header = read_params_json(out)
    megabytes = (out / MODEL_FILE).stat().st_size / 1e6
    print(
        f"lmjax.export: step {header['step']} of {args.workdir} -> {out / MODEL_FILE} "
        f"({len(header['tensors'])} tensors, {header['num_parameters']:,} parameters, {megabytes:.1f} MB) "
        f"and {out / PARAMS_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

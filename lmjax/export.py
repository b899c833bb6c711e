"""python -m lmjax.export --workdir W --out DIR [--step N] [--overwrite] [--format consolidated|hf]

consolidated (the default): DIR/model.safetensors (every parameter as one full array, named by
its path joined with '.') and DIR/params.json (model config, step, run config); load them back,
on any machine and without a mesh, with `lmjax.interop.consolidated.load_consolidated(DIR)`.

hf: DIR as a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors, and the
tokenizer's files when the run's tokenizer can write them); transformer runs only.
"""
import sys

from lmjax import cli
from lmjax.xla_flags import tune_xla_cpu_flags

PROG = "lmjax.export"


def parse_args(argv):
    p = cli.ArgumentParser(prog="lmjax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training run folder")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and params.json into")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    p.add_argument("--format", choices=("consolidated", "hf"), default="consolidated",
                   help="consolidated: lmjax's own; hf: a Hugging Face Llama folder (transformer runs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return cli.run(PROG, parse_args, export, argv)


def export(args) -> int:
    tune_xla_cpu_flags()
    from absl import logging

    from lmjax.interop.consolidated import MODEL_FILE, PARAMS_FILE, export_run, read_params_json

    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    if args.format == "hf":
        from lmjax.interop.hf import export_run_hf

        out = export_run_hf(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
        files = ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
        print(f"{PROG}: {args.workdir} -> {out} as a Hugging Face Llama folder ({files})")
        return 0
    out = export_run(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
    header = read_params_json(out)
    megabytes = (out / MODEL_FILE).stat().st_size / 1e6
    print(
        f"{PROG}: step {header['step']} of {args.workdir} -> {out / MODEL_FILE} "
        f"({len(header['tensors'])} tensors, {header['num_parameters']:,} parameters, {megabytes:.1f} MB) "
        f"and {out / PARAMS_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

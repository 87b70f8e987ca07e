"""The `dreambooth` command: train, generate, serve, demo (and the subcommands later issues add)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dreambooth.bench.table import ROWS
from dreambooth.config.schema import load_config
from dreambooth.errors import UserError
from dreambooth.sweep.command import add_sweep_parser

# Only light modules (yaml, no torch) are imported up here: `dreambooth --help` and a config mistake answer in
# about 0.1 s. Each command imports the modules that pull in torch and diffusers (seconds) inside its function.


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`CONFIG.yaml key=value ...`: the first item without '=' is the config file, the rest overrides."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UserError(f"unexpected argument '{item}': give one config file, then key=value overrides")
    return config, overrides


def cmd_train(args) -> int:
    config, overrides = _split_config_args(args.items)
    cfg = load_config(config, overrides)  # before the heavy imports: a config mistake is reported at once
    _quiet_library_bars()
    from dreambooth.training.signals import Interrupted
    from dreambooth.training.trainer import run_training
    try:
        summary = run_training(cfg)
    except Interrupted as e:
        import shlex
        kept = f"checkpoint written: {e.path}" if e.path else "no checkpoint could be written"
        again = [shlex.quote(a) for a in args.items if not a.startswith("resume=")] + ["resume=latest"]
        print(f"{e.signal_name}: stopped after step {e.step}; {kept}", file=sys.stderr)
        print(f"resume with: dreambooth train {' '.join(again)}", file=sys.stderr)
        return 130
    averaged = " (exported weights: the EMA average)" if summary.get("weights") == "ema" else ""
    print(f"trained {summary['steps']} steps in {summary['wall_time_s']:.1f} s, final loss "
          f"{summary['final_loss']:.4f}{averaged}")
    from dreambooth.config.plan import export_formats
    if "diffusers" in export_formats(cfg):
        print(f"model: {cfg.output_dir}  (load with StableDiffusionPipeline.from_pretrained, or "
              f"`dreambooth generate {cfg.output_dir} --prompt ...`)")
    from dreambooth.config.schema import is_adapter
    if is_adapter(cfg):
        from dreambooth.models.lora import adapter_file_name
        print(f"{cfg.finetune}: {Path(cfg.output_dir) / adapter_file_name(cfg.finetune)}  (`dreambooth generate "
              f"{cfg.output_dir} --prompt ...` applies it to {cfg.model})")
    return 0


def cmd_classes(args) -> int:
    config, overrides = _split_config_args(args.items)
    cfg = load_config(config, overrides)
    _quiet_library_bars()
    from dreambooth.data.class_images import class_report
    class_report(cfg)
    return 0


def add_request_args(p: argparse.ArgumentParser) -> None:
    """JumpStart's endpoint parameters; both snake_case and dashed spellings are accepted."""
    def both(name, **kw):
        p.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, **kw)
    both("prompt", nargs="+", help="one or more prompts")
    both("negative_prompt")
    both("width", type=int)
    both("height", type=int)
    both("num_inference_steps", type=int)
    both("guidance_scale", type=float)
    both("num_images_per_prompt", type=int)
    both("seed", type=int)


def cmd_generate(args) -> int:
    from dreambooth.serve.generate import Request, generate, read_payload

    fields = read_payload(args.payload) if args.payload else {}
    for name in Request.__dataclass_fields__:
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    request = Request(**fields).check()
    _quiet_library_bars()
    from dreambooth.models.pipeline import load_run_pipeline, set_scheduler
    pipe = load_run_pipeline(args.model, args.lora, args.lora_scale, allow_pickle=args.allow_pickle,
                             revision=args.revision, variant=args.variant)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    for path in generate(pipe, request, args.out_dir, quiet=args.quiet):
        print(path)
    return 0


def cmd_export(args) -> int:
    if args.step is None and args.format is None:
        raise UserError("give --format single-file|kohya, or --step best|N to export a validated step of a run")
    _quiet_library_bars()
    if args.step is not None:
        from dreambooth.training.export_step import export_step
        print(export_step(args.model, args.step, args.out, args.format, half=args.half))
        return 0
    from dreambooth.export.formats import export_model
    print(export_model(args.model, args.format, args.out, half=args.half, allow_pickle=args.allow_pickle))
    return 0


def cmd_eval(args) -> int:
    from dreambooth.eval.run import RESULT, TABLE, EvalRequest, evaluate
    req = EvalRequest(**{k: v for k, v in vars(args).items() if k in EvalRequest.__dataclass_fields__})
    _quiet_library_bars()
    result = evaluate(req)
    out = Path(result["out"])
    print((out / TABLE).read_text(), end="")
    print(f"scores: {out / RESULT}  images: {out / 'images'}")
    return 0


def cmd_bench(args) -> int:
    _quiet_library_bars()
    if args.job or args.compile_proxy:
        from dreambooth.bench.job import job_from_args
        return job_from_args(args)
    from dreambooth.bench.run import bench_from_args
    return bench_from_args(args)


def cmd_sweep(args) -> int:
    from dreambooth.sweep.command import sweep_from_args
    return sweep_from_args(args, *_split_config_args(args.items), _quiet_library_bars)


def cmd_serve(args) -> int:
    from dreambooth.serve.options import from_args

    options, spec = from_args(args)  # address, token and limits checked before torch and FastAPI load (seconds)
    try:
        from dreambooth.serve.runner import serve  # the `serve` extra: FastAPI and uvicorn
    except ImportError as e:
        raise UserError(f"dreambooth serve needs FastAPI and uvicorn ({e.name} is missing): "
                        "pip install 'dreambooth[serve]'") from None
    _quiet_library_bars()
    from dreambooth.serve.engine import resolve_spec
    return serve(resolve_spec(spec), options)


def cmd_bench_serve(args) -> int:
    _quiet_library_bars()
    from dreambooth.bench.serve import bench_serve_from_args
    return bench_serve_from_args(args)


def cmd_demo(args) -> int:
    _quiet_library_bars()
    from dreambooth.demo import run_demo
    run_demo(Path(args.out), quiet=args.quiet)
    return 0


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="default: builtin:sd21 on CUDA, builtin:sd21/4 (widths / 4) on CPU")
    p.add_argument("--resolution", type=int, help="default: 512 on CUDA, 128 on CPU")
    p.add_argument("--steps", type=int, help="timed steps per row (default 10 on CUDA, 4 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, help="interleaved passes over the matrix (default 1 on CUDA, 2 on CPU)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}, 16gb, 12gb (on CUDA "
                   "the default list adds default+compile); a row may add config overrides: default+compile, "
                   "24gb+compile+compile_mode=default, default+cache_latents=false")
    p.add_argument("--profile", default="", help="comma list of rows to profile for 2 more steps: host vs GPU "
                   "time, kernel launches, top operators")
    p.add_argument("--prior", default="both", choices=["on", "off", "both"])
    p.add_argument("--no-sampling", action="store_true", help="skip the class-image sampling measurement")
    p.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")
    p.add_argument("--table", help="also write the Markdown table here")
    p.add_argument("--workdir", help="keep the rows' data and outputs here (default: a temporary folder)")
    job = p.add_argument_group("the whole job (--job): load, class images, training with prior, validation, save")
    job.add_argument("--job", action="store_true", help="time JumpStart's example job end to end, phase by phase "
                     "(--steps: training steps, default 400 on CUDA, 5 on CPU)")
    job.add_argument("--class-images", type=int, help="num_class_images to sample (default 100 on CUDA, 4 on CPU)")
    job.add_argument("--compile", default="eager", help="comma list of eager, full, regional: the job once each")
    job.add_argument("--no-validation", action="store_true", help="the job without validation images")
    job.add_argument("--compile-cache", metavar="DIR", help="keep compiled code in DIR (default: a new folder per "
                     "variant, so each compiles from scratch); a second bench with the same DIR times a warm compile")
    job.add_argument("--compile-proxy", action="store_true", help="also time compiling builtin:sd21/16 at 32 px, each "
                     "compile in a new process: full vs regional, cold vs warm vs portable cache (minutes on CPU)")


def add_serve_parser(sub) -> None:
    from dreambooth.serve.options import add_serve_args  # light: argparse only
    p = sub.add_parser("serve", help="serve a model over HTTP: JumpStart's /invocations, A1111's txt2img, a web page",
                       description="dreambooth serve MODEL [options]: loads the model once and answers SageMaker/"
                                   "JumpStart's GET /ping and POST /invocations, AUTOMATIC1111's POST "
                                   "/sdapi/v1/txt2img, and a web page at /")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:tiny", help="default builtin:tiny (builtin:sd21 on a GPU)")
    p.add_argument("--size", type=int, help="image width and height (default 32 for builtin:tiny, else 512)")
    p.add_argument("--steps", type=int, default=10, help="inference steps per image (default 10)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of client counts (default 1,4,16)")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (default 4)")
    p.add_argument("--out", default="bench-serve.json", help="JSON results (default bench-serve.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth", description="DreamBooth fine-tuning of Stable Diffusion 2.1 base.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune on a JumpStart-format folder",
                       description="dreambooth train CONFIG.yaml [key=value ...]  (e.g. max_steps=400 data.dir=./cat)")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("classes", help="only sample the class images for prior preservation, to review them",
                       description="dreambooth classes CONFIG.yaml [key=value ...]: tops up each class_data_dir to "
                                   "num_class_images and prints where they are; delete bad ones, training tops up")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.set_defaults(func=cmd_classes)

    p = sub.add_parser("generate", help="generate images from a trained model folder")
    p.add_argument("model", help="trained output folder, diffusers folder or hub id")
    add_request_args(p)
    p.add_argument("--payload", help="a JumpStart JSON request file; command-line options override it")
    p.add_argument("--scheduler", help="dpm++, dpm++-karras, ddim, euler, euler-a, pndm or unipc")
    p.add_argument("--out-dir", default="generated", help="where PNGs are written (default: ./generated)")
    p.add_argument("--lora", help="a LoRA .safetensors file (ours or kohya/A1111 layout) to apply to the model")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when the model is a hub id")
    p.add_argument("--variant", help="weight file variant when the model is a hub id, e.g. fp16")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle weight files you trust")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a trained model as one .safetensors file or a LoRA for A1111/ComfyUI, "
                                      "or the model of a validated step",
                       description="dreambooth export MODEL_DIR --format single-file|kohya [--out FILE] [--half]; "
                                   "dreambooth export RUN --step best|N [--format ...] [--out DIR]")
    p.add_argument("model", help="a training run's output folder (full or LoRA run), or a .safetensors file")
    p.add_argument("--format", choices=["single-file", "kohya"],
                   help="single-file: one original-layout SD 2.x checkpoint plus its .yaml; kohya: the LoRA in "
                        "kohya layout")
    p.add_argument("--step", help="best (the step the run recommends, docs/evaluate.md) or a validated step number: "
                                  "its model from the checkpoint validation.keep_checkpoints kept, into --out")
    p.add_argument("--out", help="output .safetensors (default: model.safetensors or lora-kohya.safetensors in "
                                 "MODEL_DIR); with --step a folder (default: RUN/step-N)")
    p.add_argument("--half", action="store_true", help="store weights in fp16 (half the size)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle weight files you trust")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="score a trained model on DreamBench-style prompts: DINO, CLIP-I, CLIP-T",
                       description="dreambooth eval RUN_OR_MODEL [--data DIR] [--prompts auto|object|live|FILE]: "
                                   "generates the prompt set at fixed seeds, scores it against the subject's photos, "
                                   "writes eval.json and eval.md (docs/evaluate.md)")
    p.add_argument("model", metavar="RUN_OR_MODEL", help="a training run's output folder, a diffusers folder, "
                                                        ".safetensors file or hub id")
    p.add_argument("--data", help="the subject's JumpStart-format folder (default: the run's subjects)")
    p.add_argument("--prompts", default="auto", help="object, live (pets: accessories instead of half the scenes), "
                   "a file of templates with {subject}, or auto (live for pets, by the class noun; the default)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4, as DreamBench)")
    p.add_argument("--seed", type=int, default=0, help="seeds seed..seed+N-1, the same for every prompt")
    p.add_argument("--num-inference-steps", type=int, default=25, help="DPM++ steps per image (default 25)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--clip-model", help="CLIP for CLIP-I/CLIP-T: hub id or local folder "
                                        "(default: the run's eval.clip_model, openai/clip-vit-base-patch32)")
    p.add_argument("--dino-model", help="ViT for DINO: hub id or local folder "
                                        "(default: the run's eval.dino_model, facebook/dino-vits16)")
    p.add_argument("--class-noun", help="the word CLIP-T puts in place of the subject (default: from the class "
                                        "prompt, else the instance prompt's last word)")
    p.add_argument("--out", help="folder for eval.json, eval.md and the images (default: RUN/eval, or ./eval)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle weight files you trust")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmark speed and memory of the baseline and each memory profile",
                       description="dreambooth bench [options]: SD 2.1 base architecture with random weights (scaled "
                                   "down on CPU), baseline and profiles, with and without prior; JSON + table")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    kinds = p.add_subparsers(dest="bench_kind", metavar="{serve}")  # optional: plain `bench` is the training one
    q = kinds.add_parser("serve", help="latency and images/s of `dreambooth serve` at several concurrencies",
                         description="dreambooth bench serve [options]: the server on loopback against calling the "
                                     "pipeline in-process; concurrency 1, 4, 16; batching on and off; JSON out")
    add_bench_serve_args(q)
    q.set_defaults(func=cmd_bench_serve)

    add_serve_parser(sub)

    add_sweep_parser(sub, cmd_sweep)

    p = sub.add_parser("demo", help="offline tiny demo: build a tiny model, train it on CPU, generate")
    p.add_argument("--out", default="demo-output", help="folder for the demo's data, model and images")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_library_bars() -> None:
    """Hide the libraries' weight loading/saving bars; ours (training, sampling, generation) stay.

    Each command calls it once the user's input has been checked: importing the libraries takes seconds."""
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    # The libraries' own info and warnings (weight loading, dtype notes) drown our one-line messages.
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        # Segments that grow in place instead of new blocks per size: reserved memory stays near allocated
        # (set before CUDA starts; your own allocator settings win).
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a sweep prints it as the command that resumes it
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

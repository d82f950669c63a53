"""`commonlm`: the command line, a thin layer over the Python API.

Every verb turns a `UserError` into one red line on stderr and exit status 2; `--debug` shows the
traceback instead. Heavy modules are imported inside the verbs so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from commonlm import __version__
from commonlm.errors import UserError, already_exists


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from commonlm.data.sources import iter_texts
    from commonlm.data.tokenizer import Tokenizer
    from commonlm.utils import console

    out = Path(args.out)
    # A model's weights and a prepared data directory's shards are only meaningful with their own tokenizer:
    # a new one there breaks them (generate crashed with an IndexError), so --overwrite does not apply.
    owner = next((f for f in ("commonlm.yaml", "config.json", "index.json") if (out / f).is_file()), None)
    if owner:
        raise UserError(f"tokenizer train: {out} holds {owner}: its {'data' if owner == 'index.json' else 'model'} "
                        "belongs to the tokenizer there; choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"tokenizer train: --out {out} is a file; give a directory")
    if (out / "tokenizer.json").exists() and not args.overwrite:
        raise already_exists("tokenizer train", out / "tokenizer.json")
    if args.kind == "byte":
        tok = Tokenizer.byte_level()
    else:
        texts = iter_texts(args.input, include=args.include, text_field=args.text_field)
        tok = Tokenizer.train_bpe(texts, vocab_size=args.vocab_size)
    tok.save(out)
    console.print(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens, saved to {out}/tokenizer.json")
    if tok.kind == "bpe" and tok.vocab_size < args.vocab_size:
        console.print(f"note: asked for {args.vocab_size} tokens, but the corpus only supports {tok.vocab_size} "
                      "(no more pairs occur twice); more text gives more", soft_wrap=True)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from commonlm.data.prepare import prepare

    if args.format == "prompts":
        from commonlm.data.prompts import prepare_prompts

        prepare_prompts(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, overwrite=args.overwrite)
        return
    if args.format in ("chat", "preference"):
        from commonlm.data.chat import prepare_chat

        prepare_chat(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, overwrite=args.overwrite,
                     preference=args.format == "preference")
        return
    prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, include=args.include,
            text_field=args.text_field, workers=args.workers, overwrite=args.overwrite)


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set a=1 b=2 --set c=3, flattened."""
    return [item for group in args.set or [] for item in group]


def cmd_train(args: argparse.Namespace) -> int:
    """Exit status 0, or 130/143 when SIGINT/SIGTERM stopped the run (saved; see TrainResult.exit_status)."""
    from commonlm.config import apply_overrides, config_from_dict, load_config
    from commonlm.train.trainer import resume_config, train

    overrides = _overrides(args) + ([f"train.swarm={args.swarm}"] if args.swarm else [])
    if args.resume:
        if args.config:
            raise UserError("--resume takes the config saved in the run; drop --config (use --set to change values)")
        out = Path(args.resume)
        config = resume_config(out)
        config = config_from_dict(apply_overrides(config.to_dict(), overrides))
        if args.data:
            config.data.path = args.data
        config.validate()
        return train(config, out, resume=True, stop_at_step=args.stop_at_step).exit_status
    if not args.out:
        raise UserError("train: --out RUN_DIR is required (where checkpoints and the final model go)")
    if not args.config and not args.init:
        raise UserError("train: --config PRESET_OR_YAML is required (see `commonlm presets`)")
    if args.init:  # the init model's config, and --set model.* changes to it (a longer context: train/extend.py)
        from commonlm.train.extend import init_run_config

        config = init_run_config(args.init, args.config, overrides)
    else:
        config = load_config(args.config, overrides)
    if args.data:
        config.data.path = args.data
    return train(config, args.out, init=args.init, stop_at_step=args.stop_at_step).exit_status


def cmd_swarm_lighthouse(args: argparse.Namespace) -> None:
    from commonlm.scale.lighthouse import run_lighthouse

    run_lighthouse(args.bind, args.min_replicas, args.join_timeout_ms, args.heartbeat_timeout_ms)


def cmd_tune(args: argparse.Namespace) -> int:
    """tune sft, dpo and grpo: the same loop from --init, with the verb's config."""
    from commonlm.train.trainer import train
    from commonlm.tune.dpo import dpo_config
    from commonlm.tune.grpo import grpo_config
    from commonlm.tune.sft import sft_config

    make = {"sft": sft_config, "dpo": dpo_config, "grpo": grpo_config}[args.action]
    flags = [f"train.lora_rank={args.lora_rank}"] if args.lora_rank else []
    flags += [f"train.base_quant={args.quantize_base}"] if args.quantize_base else []
    flags += [f"train.reward={args.reward}"] if getattr(args, "reward", None) else []
    config = make(args.init, args.data, flags + _overrides(args))
    return train(config, args.out, init=args.init, stop_at_step=args.stop_at_step).exit_status


def cmd_merge(args: argparse.Namespace) -> None:
    from commonlm.tune.lora import merge_adapter_dir
    from commonlm.utils import console

    out = merge_adapter_dir(args.adapter, args.base, args.out, overwrite=args.overwrite)
    console.print(f"merged {args.adapter} into {out} (a plain model directory)")


def cmd_eval(args: argparse.Namespace) -> None:
    from commonlm.api import load

    if bool(args.data) == bool(args.task):
        raise UserError("eval: give --data DIR (loss, perplexity and bits per byte on a prepared split) or --task "
                        "PATH_OR_NAME ... (downstream tasks), one of the two")
    if args.task:
        from commonlm.evaluate.scoring import table
        from commonlm.evaluate.tasks import load_tasks
        from commonlm.utils import atomic_write_json

        if args.few_shot is not None and args.few_shot < 0 or args.limit is not None and args.limit < 1:
            raise UserError(f"eval: --few-shot must be >= 0 and --limit >= 1 (got {args.few_shot}, {args.limit})")
        tasks = [task for spec in args.task for task in load_tasks(spec, args.data_root)]  # bad input before loading
        for task in tasks:
            if task.metric == "code":
                from commonlm.evaluate.code import check_timeout

                task.code_timeout = check_timeout(args.code_timeout)
        m, _ = _inference_model(args)
        results = m.evaluate_tasks(tasks, few_shot=args.few_shot, limit=args.limit, batch_size=args.batch_size)
        print(f"{m.path}" + (f" ({args.quantize})" if args.quantize else "") + "\n" + table(results))
        if any(r.truncated for r in results):
            print(f"note: {sum(r.truncated for r in results)} prompts were longer than the model's context "
                  f"({m.model.config.max_seq_len} tokens) and lost their beginning, as lm-evaluation-harness "
                  "does" + ("; fewer --few-shot keeps more of them whole" if args.few_shot else ""), file=sys.stderr)
        if args.json:
            atomic_write_json(Path(args.json), [r.as_dict(per_item=True) for r in results])
        return
    m = load(args.model, device=args.device)
    result = m.evaluate(args.data, split=args.split, max_tokens=args.max_tokens, batch_size=args.batch_size)
    print(f"{m.path}  {args.split}: loss {result.loss:.4f} · perplexity {result.perplexity:.3f} · "
          f"bits/byte {result.bits_per_byte:.4f} · {result.tokens:,} tokens")


def cmd_report(args: argparse.Namespace) -> None:
    from commonlm.evaluate.report import write_report
    from commonlm.utils import console

    out = write_report(args.run, args.out, samples=not args.no_samples, prompts=args.prompt,
                       max_tokens=args.max_tokens, device=args.device, overwrite=args.overwrite)
    console.print(f"report: {out} (PNG plots beside it)")


def cmd_compare(args: argparse.Namespace) -> None:
    from commonlm.evaluate.report import compare
    from commonlm.utils import console

    out = compare(args.models, args.task, args.out, few_shot=args.few_shot, limit=args.limit,
                  data_root=args.data_root, batch_size=args.batch_size, device=args.device, fresh=args.fresh,
                  overwrite=args.overwrite)
    console.print(f"compare: {out} (and {out.with_suffix('.png').name} beside it)")
    print(out.read_text(encoding="utf-8"))


def cmd_generate(args: argparse.Namespace) -> None:
    from commonlm.infer.generate import SamplingParams

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop=args.stop or [])
    SamplingParams(**sampling)  # bad values are refused before the model loads
    if args.num_samples < 1:
        raise UserError(f"generate: --num-samples {args.num_samples} must be at least 1")
    m, _ = _inference_model(args)
    _note_if_cut(m, args.prompt, args.max_tokens)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}", flush=True)
        if args.seed is not None:
            sampling["seed"] = args.seed + i
        sys.stdout.write(args.prompt)
        for piece in m.stream(args.prompt, compile=args.compile, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _note_if_cut(lm, prompt: str, max_tokens: int) -> None:
    """Say so (stderr) when the model's context leaves room for fewer new tokens than --max-tokens asks."""
    from commonlm.utils import console

    context = lm.model.config.max_seq_len
    prompt_tokens = min(max(1, len(lm.tokenizer.encode(prompt))), context - 1)  # as stream_text keeps it
    room = context - prompt_tokens + 1  # stream_ids samples the last one from the context's last position
    if max_tokens > room:
        console.print(f"note: --max-tokens {max_tokens} cut to {room}: the model's context is {context} tokens "
                      f"and the prompt takes {prompt_tokens}", soft_wrap=True)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from commonlm.quickstart import quickstart

    return quickstart(out=args.out, train_seconds=args.seconds, overwrite=args.overwrite, chat=args.chat,
                      sft_seconds=args.sft_seconds)["exit_status"]


def cmd_import(args: argparse.Namespace) -> None:
    from commonlm.interop.importer import import_hf
    from commonlm.utils import console

    out = import_hf(args.source, args.out)
    console.print(f"imported {args.source} → {out} (continue pretraining with: commonlm train --init {out} ...)")


def cmd_export(args: argparse.Namespace) -> None:
    from commonlm.api import load
    from commonlm.utils import console

    out = Path(args.out)  # checked before the work, which takes a while
    if out.is_dir():
        raise UserError(f"export: --out {out} is a directory; give a file name, e.g. {out / ('model.' + args.format)}")
    if out.exists() and not args.overwrite:
        raise already_exists("export", out)
    m = load(args.model, device="cpu")
    if args.format == "onnx":
        from commonlm.interop.onnx_export import export_onnx

        out = export_onnx(m.model, args.out)
    else:
        from commonlm.interop.gguf_export import export_gguf

        out = export_gguf(m.model, m.tokenizer, args.out, quant=args.quant, name=Path(args.model).name)
    console.print(f"exported {m.path} → {out} ({out.stat().st_size / 1e6:.1f} MB)")


def _inference_model(args: argparse.Namespace):
    """Load a model for generating, chatting or serving, in the dtype and quantization asked for."""
    from commonlm.api import load
    from commonlm.infer.packed import can_pack, pack_linears
    from commonlm.runtime import pick_dtype

    lm = load(args.model, device=args.device, adapter=args.adapter)
    # no autograd graph in any forward pass, and none behind the packed or quantized weights: the model's own
    # switch, not torch's global one (in-process callers, tests among them, go on to train)
    lm.model.requires_grad_(False)
    dtype = pick_dtype(args.dtype, lm.model.embed.weight.device)
    lm.model.to(dtype)
    if not args.quantize and not getattr(args, "compile", False) and can_pack(lm.model):
        pack_linears(lm.model)  # bf16 on CPU: weights laid out once for oneDNN (infer/packed.py)
    if args.quantize:
        from commonlm.infer.quant import quantize_model

        try:
            quantize_model(lm.model, args.quantize, dtype=dtype)
        except ValueError as e:
            raise UserError(f"--quantize {args.quantize}: {e}") from None
    return lm, dtype


def _model_name(path: Path) -> str:
    return path.parent.name if path.name == "final" else path.name


def cmd_serve(args: argparse.Namespace) -> None:
    from commonlm.api import resolve_model_path
    from commonlm.serve.app import LOOPBACK_HOSTS, ServeSettings, serve
    from commonlm.utils import console

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not api_key:
        console.print(f"[yellow]warning: serving on {args.host} without an API key (see --api-key-env)[/]")
    path = resolve_model_path(args.model)
    settings = ServeSettings(
        model_name=args.name or _model_name(path), api_key=api_key, max_batch=args.max_batch,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_queue=args.max_queue,
        timeout_s=args.timeout,
        # without a key on this machine only: answer only requests addressed to it by name (DNS rebinding)
        allowed_hosts=LOOPBACK_HOSTS if loopback and not api_key else (),
    )
    def load():
        lm, dtype = _inference_model(args)
        console.print(f"serving {lm.path} as '{settings.model_name}' ({str(dtype).replace('torch.', '')}"
                      f"{', ' + args.quantize if args.quantize else ''}) on http://{args.host}:{args.port}/")
        return lm

    console.print(f"loading {path} (http://{args.host}:{args.port}/ answers 503 until it is ready)")
    serve(load, settings, args.host, args.port)


def cmd_chat(args: argparse.Namespace) -> None:
    from commonlm.infer.chat import fit_conversation
    from commonlm.infer.generate import SamplingParams, stream_text

    lm, _ = _inference_model(args)
    context = lm.model.config.max_seq_len
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"chatting with {lm.path}; /reset starts over, /quit leaves, Ctrl-C stops a reply", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            print("(history cleared)", flush=True)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            fitted = fit_conversation(lm.tokenizer, messages, context, args.max_tokens)
        except UserError as e:
            messages.pop()
            print(f"({e})", flush=True)
            continue
        if fitted.dropped:
            messages = messages[:1] + messages[1 + fitted.dropped:] if args.system else messages[fitted.dropped:]
            print(f"(left out the {fitted.dropped} oldest messages to fit the context of {context} tokens)",
                  flush=True)
        if fitted.max_tokens < args.max_tokens:
            print(f"(the reply can take {fitted.max_tokens} tokens before the context of {context} is full)",
                  flush=True)
        params = SamplingParams(max_tokens=fitted.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
        sys.stdout.write("model> ")
        answer = []
        try:
            for piece in stream_text(lm.model, lm.tokenizer, fitted.ids, params, compile=args.compile):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stops this reply; the conversation goes on with what was said
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})


def cmd_presets(args: argparse.Namespace) -> None:
    import torch

    from commonlm.config import PRESET_DIR, list_presets, load_config
    from commonlm.model.decoder import Decoder
    from commonlm.utils import human

    for name in list_presets():
        c = load_config(name).model
        c.vocab_size = c.vocab_size or (50257 if c.family == "gpt2" else 32000)
        with torch.device("meta"):  # counts parameters without allocating them
            params = Decoder(c).num_params()
        print(f"{name:12s} {c.family:6s} {human(params):>8s} params at vocab {c.vocab_size:<6d} {c.n_layer:2d} layers  "
              f"d_model {c.d_model:5d}  heads {c.n_head}/{c.kv_heads}  context {c.max_seq_len:5d}  "
              f"{PRESET_DIR / name}.yaml")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, except where there is none to show (None, a switch's False)
    or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _VerbParser(argparse.ArgumentParser):
    """The parser of every verb: its help shows defaults, and it takes --debug after the verb too (users type
    it at the end); SUPPRESS keeps the verb from resetting a --debug given before it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show full tracebacks for errors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="commonlm", description="Build your own language model: raw text to a model.")
    p.add_argument("--version", action="version", version=f"commonlm {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_VerbParser)

    def inputs(q: argparse.ArgumentParser) -> None:
        q.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="files, directories, .jsonl, .parquet, or 'stdlib' (this Python's standard library)")
        q.add_argument("--include", nargs="+", metavar="GLOB", help="file-name globs to take from directories")
        q.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.parquet")

    def sampling(q: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
        q.add_argument("--max-tokens", type=int, default=max_tokens, help="the most new tokens (the context may cap)")
        q.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
        q.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: off)")
        q.add_argument("--top-p", type=float, default=0.95,
                       help="sample among the likeliest tokens holding this much probability, in (0, 1] (1: off)")
        q.add_argument("--seed", type=int, help="random seed, for repeatable samples (default: none)")
        q.add_argument("--compile", action="store_true",
                       help="compile the decode step: seconds once, then faster tokens (long outputs)")

    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="train a byte-level BPE tokenizer (or make a byte tokenizer)")
    t.add_argument("--kind", choices=["bpe", "byte"], default="bpe", help="byte-level BPE, or plain bytes")
    inputs(t)
    t.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (a small corpus gives fewer)")
    t.add_argument("--out", required=True, help="directory for tokenizer.json")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    t.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="action", required=True)
    d = data.add_parser("prepare", help="tokenize text into token shards")
    inputs(d)
    d.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    d.add_argument("--format", choices=["text", "chat", "preference", "prompts"], default="text",
                   help="text: documents to token shards; chat: jsonl conversations to tokens + loss mask; "
                   "preference: jsonl {prompt|messages, chosen, rejected} pairs for tune dpo; "
                   "prompts: jsonl {prompt|messages, answer} for tune grpo")
    d.add_argument("--out", required=True, help="new directory for the token shards")
    d.add_argument("--val-fraction", type=float, default=0.01, help="share of the tokens held out for validation")
    d.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    d.set_defaults(func=cmd_data_prepare)

    tr = sub.add_parser("train", help="pretrain (or continue) a model")
    tr.add_argument("--config", help="preset name (see `commonlm presets`) or YAML file")
    tr.add_argument("--data", help="prepared data directory")
    tr.add_argument("--out", help="run directory")
    tr.add_argument("--set", action="append", nargs="+", metavar="KEY=VALUE",
                    help="override config values, e.g. --set train.lr=3e-4 model.n_layer=6")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    tr.add_argument("--init", metavar="MODEL_DIR", help="start from the weights of a model directory")
    tr.add_argument("--stop-at-step", type=int, help="save and stop after this step (resume later)")
    tr.add_argument("--swarm", metavar="HOST:PORT",
                    help="join a decentralized run as a volunteer: DiLoCo with the lighthouse there (train.swarm*)")
    tr.set_defaults(func=cmd_train)

    sw = sub.add_parser("swarm", help="decentralized training over torchft").add_subparsers(dest="action",
                                                                                            required=True)
    lh = sw.add_parser("lighthouse", help="the coordinator volunteers join with `commonlm train --swarm HOST:PORT`")
    lh.add_argument("--bind", default="0.0.0.0:29510",
                    help="HOST:PORT to listen on (default every interface, port 29510; restrict it to a VPN's address)")
    lh.add_argument("--min-replicas", type=int, default=2, help="volunteers a quorum needs (default 2)")
    lh.add_argument("--join-timeout-ms", type=int, default=60000,
                    help="how long a quorum waits for volunteers that are up but not at a sync yet (default 60000)")
    lh.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                    help="silence after which a volunteer counts as gone (default 5000)")
    lh.set_defaults(func=cmd_swarm_lighthouse)

    tune = sub.add_parser("tune", help="fine-tune a trained model").add_subparsers(dest="action", required=True)
    for verb, what, fmt in [("sft", "supervised fine-tuning on conversations", "chat"),
                            ("dpo", "direct preference optimization on chosen/rejected pairs", "preference"),
                            ("grpo", "reinforcement learning with verifiable rewards (GRPO) on prompts", "prompts")]:
        sft = tune.add_parser(verb, help=f"{what} (data prepare --format {fmt})")
        sft.add_argument("--init", required=True, metavar="MODEL_OR_RUN",
                         help="the model to fine-tune" + (" (also the frozen reference)" if verb == "dpo" else ""))
        sft.add_argument("--data", required=True, help=f"data made with `commonlm data prepare --format {fmt}`")
        sft.add_argument("--out", required=True, help="run directory (continue it with `commonlm train --resume`)")
        sft.add_argument("--set", action="append", nargs="+", metavar="KEY=VALUE",
                         help="override config values, e.g. --set train.lr=5e-5 train.max_steps=1000")
        sft.add_argument("--stop-at-step", type=int, help="save and stop after this step (resume later)")
        sft.add_argument("--lora-rank", type=int, default=0,
                         help="train LoRA adapters of this rank on a frozen base (0: all weights); train.lora_*")
        sft.add_argument("--quantize-base", choices=["int8", "int4"],
                         help="with --lora-rank: keep the frozen base quantized (QLoRA)")
        if verb == "grpo":
            sft.add_argument("--reward", required=True, metavar="CHECKER",
                             help="gsm8k (final number equals the answer), exact (exact match), or FILE.py:FUNCTION "
                             "(your own Python, run in this process)")
        sft.set_defaults(func=cmd_tune)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base: a plain model directory")
    mg.add_argument("adapter", help="adapter directory (a LoRA run's final/ or checkpoint, or a PEFT adapter)")
    mg.add_argument("--base", help="the base model directory (default: the one the adapter names)")
    mg.add_argument("--out", required=True, help="new model directory")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    mg.set_defaults(func=cmd_merge)

    ev = sub.add_parser("eval", help="validation loss, perplexity and bits per byte, or downstream tasks")
    ev.add_argument("model", help="run directory, model directory or checkpoint")
    ev.add_argument("--data", help="prepared data directory (loss, perplexity, bits per byte)")
    ev.add_argument("--task", nargs="+", metavar="PATH_OR_NAME", help="downstream tasks: task files (.yaml), "
                    "BIG-bench task.json or its directory, or mmlu, gsm8k, humaneval, bigbench:NAME (--data-root)")
    ev.add_argument("--few-shot", type=int, help="examples before each item (default: each task's own)")
    ev.add_argument("--limit", type=int, help="evaluate this many items of each task, spread over it")
    ev.add_argument("--data-root", help="where named tasks live (default: $COMMONLM_DATA_ROOT, else ../shared/data)")
    ev.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="with --task: weights in memory")
    ev.add_argument("--quantize", choices=["int8", "int4"], help="with --task: weight-only quantization")
    ev.add_argument("--adapter", metavar="DIR", help="with --task: a LoRA adapter directory to apply")
    ev.add_argument("--json", metavar="FILE", help="with --task: also write the results, item by item, to this file")
    ev.add_argument("--code-timeout", type=float, metavar="SECONDS", help="code tasks (humaneval) EXECUTE "
                    "model-written code, each program in a subprocess killed after this long; they run only with it")
    ev.add_argument("--split", default="val", help="val or train")
    ev.add_argument("--max-tokens", type=int, default=0, help="evaluate only this many tokens (0: all)")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="a markdown report of a run: summary, curves, evaluations, samples, config")
    rp.add_argument("run", help="run directory (the --out of train or tune)")
    rp.add_argument("--out", help="markdown file (default RUN/report.md); its PNG plots go beside it")
    rp.add_argument("--overwrite", action="store_true", help="replace an existing report")
    rp.add_argument("--no-samples", action="store_true", help="skip the samples (no model is loaded)")
    rp.add_argument("--prompt", action="append", metavar="TEXT", help="a sample prompt (repeatable)")
    rp.add_argument("--max-tokens", type=int, default=48, help="tokens per sample (greedy)")
    rp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="runs or models side by side on the same tasks (a markdown table and plot)")
    cp.add_argument("models", nargs="+", metavar="RUN_OR_MODEL", help="run or model directories")
    cp.add_argument("--task", nargs="+", metavar="PATH_OR_NAME", help="tasks, as for eval (default: the results "
                    "stored in each one's eval/*.json)")
    cp.add_argument("--few-shot", type=int, help="examples before each item (default: each task's own)")
    cp.add_argument("--limit", type=int, help="this many items of each task, spread over it")
    cp.add_argument("--data-root", help="where named tasks live (default: $COMMONLM_DATA_ROOT, else ../shared/data)")
    cp.add_argument("--fresh", action="store_true", help="score every task here, ignoring stored results")
    cp.add_argument("--out", default="compare.md", help="markdown file (its .png beside it)")
    cp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cp.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    cp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    cp.set_defaults(func=cmd_compare)

    def inference(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="run directory, model directory or checkpoint")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        q.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                       help="weights in memory (auto: bf16 where the hardware does it natively)")
        q.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization")
        q.add_argument("--adapter", metavar="DIR", help="a LoRA adapter directory to apply on top of the model")

    g = sub.add_parser("generate", help="sample text from a model")
    inference(g)
    g.add_argument("--prompt", default="\n", help="text to continue (default: a newline; '': from the start of a text)")
    sampling(g, max_tokens=200, temperature=0.8)
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    g.add_argument("--num-samples", type=int, default=1, help="samples to draw (seeds SEED, SEED+1, ...)")
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quickstart", help="train a small model on this Python's standard library (a few minutes)")
    q.add_argument("--out", help="where everything goes (runs/quickstart, with --chat runs/quickstart-chat)")
    q.add_argument("--seconds", type=float, default=240.0, help="training time budget")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run")
    q.add_argument("--chat", action="store_true", help="go on to a chat model: fine-tune on conversations built "
                   "from the standard library's docstrings, then chat")
    q.add_argument("--sft-seconds", type=float, default=180.0, help="with --chat: fine-tuning time budget")
    q.set_defaults(func=cmd_quickstart)

    im = sub.add_parser("import", help="import a local Hugging Face model directory (GPT-2, Llama, Mistral, Qwen2/3)")
    im.add_argument("source", help="directory with config.json, tokenizer.json and safetensors weights")
    im.add_argument("--out", required=True, help="new CommonLM model directory")
    im.set_defaults(func=cmd_import)

    ex = sub.add_parser("export", help="export a model to ONNX or GGUF (llama.cpp)")
    ex.add_argument("model", help="run directory, model directory or checkpoint")
    ex.add_argument("--format", choices=["onnx", "gguf"], required=True, help="ONNX (forward pass) or GGUF (llama.cpp)")
    ex.add_argument("--out", required=True, help="output file")
    ex.add_argument("--quant", choices=["f32", "f16", "q8_0"], default="f16", help="GGUF weight type")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    inference(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port to bind")
    sv.add_argument("--api-key-env", metavar="VAR", help="require the API key held in this environment variable")
    sv.add_argument("--name", help="model name in the API (default: the run's name)")
    sv.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    sv.add_argument("--max-prompt-tokens", type=int, default=0, help="0: the model's context")
    sv.add_argument("--max-tokens", type=int, default=2048, help="the most tokens a request may ask for")
    sv.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    sv.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="chat with a model in the terminal")
    inference(ch)
    ch.add_argument("--system", help="system prompt")
    sampling(ch, max_tokens=256, temperature=0.7)
    ch.set_defaults(func=cmd_chat)

    pr = sub.add_parser("presets", help="list the configuration presets")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    # PyTorch puts tensors of 2 MiB and more in transparent huge pages when this is set (Linux; read at the
    # first large allocation). Fewer TLB misses: int8 decoding ran 1.07-1.12x faster on our CPU
    # (BENCHMARKS.md). THP_MEM_ALLOC_ENABLE=0 turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)  # a verb may return an exit status (train: 130/143 when a signal stopped it)
    except UserError as e:
        if args.debug:
            raise
        from rich.text import Text

        from commonlm.utils import console

        # (a Text: the message holds the user's own words, where rich would read [tags] and :emoji: codes)
        console.print(Text.assemble(("error:", "bold red"), f" {e}"), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (silences the flush at exit)
        return 0
    return status or 0


if __name__ == "__main__":
    sys.exit(main())

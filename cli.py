"""numgguf: run, trace and inspect GGUF language models on the CPU.

Usage:
  cli run [MODEL] [--prompt TEXT] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--raw] [--no-escape] [--threads N] [--ctx N] [--exact] [--patch SPEC]... [--steer SPEC]... [--ablate SPEC]...
  cli score [MODEL] (--text TEXT | --ids IDS) [--raw] [--no-escape] [--top N] [--json] [--threads N] [--exact] [--patch SPEC]... [--steer SPEC]... [--ablate SPEC]...
  cli trace [MODEL] [--prompt TEXT] [--raw] [--no-escape] [--stages LIST] [--layers RANGE] [--out DIR] [--stats] [--force] [--threads N] [--engine NAME] [--exact] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--patch SPEC]... [--steer SPEC]... [--ablate SPEC]...
  cli diff PATH_A PATH_B [--atol X] [--rtol Y] [--json]
  cli bisect [MODEL] [--prompt TEXT] [--raw] [--no-escape] [--reference-model PATH] [--min-cosine C] [--atol X] [--rtol Y] [--plot FILE] [--json] [--threads N] [--max-tokens N] [--against NAME] [--isolate]
  cli patch [MODEL] [--clean TEXT] [--corrupt TEXT] [--raw] [--no-escape] [--stage STAGE] [--layers RANGE] [--metric M] [--plot FILE] [--json] [--threads N] [--exact]
  cli lens [MODEL] [--prompt TEXT] [--raw] [--no-escape] [--top N] [--layers RANGE] [--plot FILE] [--json] [--threads N] [--exact]
  cli bench [MODEL] [--prompt-tokens N] [--gen-tokens N] [--threads N] [--repeat N] [--ctx-fill N] [--roofline] [--vs-llama-cpp] [--flash-attn MODE] [--json]
  cli tokenize TEXT [--special] [--no-escape]
  cli tokenize MODEL TEXT [--special] [--no-escape]
  cli fetch [KEY]
  cli inspect MODEL
  cli collect [MODEL] --prompts FILE --out DIR [--raw] [--stages LIST] [--layers RANGE] [--max-prompt-tokens N] [--shard-tokens N] [--workers N] [--worker-threads N] [--ray] [--ray-address ADDRESS] [--exact]
  cli export COLLECTION --format FMT --out DIR [--force]
  cli contracts [NAMES...] [--mutate] [--json]
  cli (-h | --help)

Commands:
  run        Generate text (streamed to stdout; statistics on stderr).
  score      Teacher-forced forward over a sequence: log p of each next token, top-N, perplexity.
  trace      The selected stages written as APRT files (zero copy): of the prompt's prefill, or
             (with --max-tokens) of the whole generation.
  diff       Compare two captures (or two .bin files); name the first stage that parts.
  bisect     Capture every stage of every layer with our engine and with llama.cpp; name the
             first (layer, stage) that diverges (needs llama-cpp-python: pip install '.[llamacpp]').
  patch      Activation-patching sweep: the corrupted prompt run once per (layer, position) with
             that activation of --stage taken from the clean prompt's run; prints the fraction
             of --metric recovered, (patched - corrupt) / (clean - corrupt).
  lens       Logit lens: each layer's residual stream through the final norm and the output head,
             per position the top-N tokens and their probabilities.
  bench      Prefill and decode tokens/s, time to first token and peak RSS; with --vs-llama-cpp
             llama.cpp's on the same file, prompt, threads and greedy decode, measured interleaved,
             medians and ratios ours/llama.cpp.
  tokenize   Print token ids as a JSON list (like llama.cpp's llama-tokenize).
  fetch      Download and verify a known model into the cache (all of them without KEY).
  inspect    Print whether we can run a model (if not, what is missing; exit 1), its config and tensor types.
  collect    Collect the selected stages of every prompt of a prompts file (one prefill forward
             each) into resumable shards of memory-mapped APRT files, with local worker
             processes or Ray actors; run the same command again to resume after a stop.
  export     Write a collection as one safetensors file or an Arrow IPC stream file (what
             Hugging Face datasets opens with Dataset.from_file); needs '.[export]'.
  contracts  Validate contracts/*.yaml and run their falsification tests; with --mutate run each
             test again under its fail point and fail if any test does not catch it.

MODEL is a known key (fetched on first use) or a path to a GGUF file;
default qwen2.5-coder-1.5b-q4_k_m. Known keys: qwen2.5-coder-1.5b-q4_k_m,
qwen2.5-coder-0.5b-q4_k_m, smollm2-135m-q4_1.

Options:
  --prompt TEXT      The prompt (run: "Write a Python function that reverses a string.";
                     trace: "What is 2+2?").
  --raw              Send the text as is (special tokens like <|im_start|> in it are parsed);
                     otherwise the model's chat template is applied.
  --no-escape        Take --prompt, --text and TEXT literally. By default, as in llama.cpp's
                     CLI, the escapes \\n \\r \\t \\' \\" \\\\ and \\xHH are processed, so a shell
                     argument can hold a chat turn's newlines.
  --max-tokens N     Stop after N generated tokens (run: default 256). trace: generate N tokens and
                     capture every forward (prefill and each decode step); without it, the prompt's
                     prefill only.
  --temperature T    0 = greedy [default: 0].
  --top-k K          Keep the K most likely tokens, 0 = off [default: 0].
  --top-p P          Nucleus sampling mass in (0, 1] [default: 1.0].
  --seed S           Seed for sampling (runs with the same seed repeat).
  --threads N        Worker threads [default: 2].
  --ctx N            Context size in tokens (default: the model's, at most 32768).
  --exact            float32 arithmetic throughout (slower): every weight dequantized exactly and
                     K/V kept in float32 (attention scores summed in float64), for comparison
                     with a float reference. By default
                     activations are rounded to int8 for quantized matmuls and K/V to f16, as
                     llama.cpp does.
  --text TEXT        Text to score.
  --ids IDS          Comma-separated token ids to score, e.g. 9707,11,1879.
  --top N            Candidates to show per position [default: 5].
  --json             Print one JSON object.
  --stages LIST      Comma list of stage names, layer_output, or all [default: all].
  --layers RANGE     Layers to capture: 0-3, 5, 0-3,7 or all [default: all].
  --out DIR          trace: capture folder (default: traces/<model>-<time>); collect: the
                     collection's folder (new, or one to resume); export: the file written.
  --prompts FILE     collect: JSON Lines (.jsonl/.ndjson/.json, a "text" string per line) or plain
                     text (one prompt per line, taken literally); blank lines are skipped.
  --max-prompt-tokens N  collect: longer prompts are cut to their first N tokens (counted in the
                     manifest; default: the context size, at most 32768).
  --shard-tokens N   collect: a shard closes once it holds N tokens' rows (default: the
                     dataset's tokens / 64, from 512 to 16384).
  --workers N        collect: local worker processes, each loading the model (default 1: this
                     process); with --ray the Ray actors (default: the cluster's CPUs / threads).
  --worker-threads N  collect: Numba threads per worker (default: cores / workers; 1 with --ray).
  --ray              collect: run the shards as Ray actors, on a local Ray cluster it starts
                     (or --ray-address's); needs '.[ray]'. `--ray ADDRESS` is --ray-address.
  --ray-address ADDRESS  collect: a running Ray cluster (host:port, ray://host:port or auto);
                     the output folder and the model must be at the same path on every node.
  --format FMT       export: safetensors or arrow.
  --stats            Print and store per-stage activation statistics.
  --force            Replace the capture in a non-empty --out folder.
  --atol X           Absolute tolerance (diff: default 1e-8; bisect: off unless given).
  --rtol Y           Relative tolerance (diff: default 1e-5; bisect: off unless given).
  --engine NAME      Whose forward trace captures: numgguf or llama.cpp [default: numgguf].
  --reference-model PATH  The GGUF llama.cpp runs in bisect (default: MODEL itself).
  --min-cosine C     bisect: a stage agrees when cosine(ours, reference) >= C (default 0.99;
                     0.98 for --max-tokens against llama.cpp, whose decode rows are single
                     tokens: noisier than whole prompts, measured down to 0.991).
  --against NAME     bisect --max-tokens: the reference, llama.cpp (decoding our generated tokens
                     step by step) or prefill (our own teacher-forced prefill of the whole
                     sequence, no llama.cpp needed) [default: llama.cpp].
  --isolate          bisect: run each of our layers on the reference's own input to it (its
                     previous layer's output patched in), so each layer's difference is its own,
                     not accumulated; the thresholds are far tighter (cosine 0.9998).
  --plot FILE        Write a picture (needs matplotlib): bisect, a per-layer, per-stage heat map of
                     1 - cosine; patch, the layer x position map of the recovered fraction; lens,
                     the layer x position grid of top-1 tokens.
  --clean TEXT       patch: the prompt whose activations are patched in.
  --corrupt TEXT     patch: the prompt they are patched into (as many tokens as --clean).
  --stage STAGE      patch: the stage patched, e.g. post_ffn_residual, attn_out, ffn_out.
  --metric M         patch: "logit-diff A B", logit[A] - logit[B] at the last position; A and B
                     are token ids or one token's text ('quoted' to keep a leading space).
  --special          Parse special-token text (e.g. <|im_start|>) as special tokens.
  --prompt-tokens N  bench: prompt length in tokens [default: 128].
  --gen-tokens N     bench: greedy tokens to generate [default: 64].
  --repeat N         bench: interleaved repeats; medians are reported [default: 3].
  --vs-llama-cpp     bench: measure llama.cpp (llama-cpp-python) on the same file too.
  --flash-attn MODE  bench: llama.cpp's flash attention: off, on, or both (two instances;
                     ratios against the faster) [default: off].
  --ctx-fill N       bench: decode speed with N tokens in the cache: an N-token prompt (in place
                     of --prompt-tokens) prefilled once per engine, each repeat decoding from
                     position N.
  --roofline         bench: the machine's measured read bandwidth, the bytes a decode step
                     reads, and decode as a fraction of that bound.
  --mutate           contracts: also run every test under its mutation (fail point).
  --patch SPEC       STAGE:LAYER=CAPTURE[@POSITIONS]: the stage's values replaced by those of a
                     capture (ours or llama.cpp's) of the same model; repeatable.
  --steer SPEC       STAGE:LAYER=FILE.npy[*ALPHA][@POSITIONS]: add ALPHA times a vector [width]
                     or a matrix [positions, width]; repeatable.
  --ablate SPEC      STAGE:LAYER[/hHEAD][@POSITIONS]: zero the values (attention, attn_scores,
                     attn_softmax: of one head); repeatable. POSITIONS: 5, 0-3, -1 (the prompt's
                     last), comma lists; default all. Whole-model stages take no :LAYER.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads fight Numba's


def _int(args, key, lo=None, hi=None):
    v = args[key]
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        raise EngineError(f"{key} must be an integer, got {v!r}") from None
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise EngineError(f"{key} must be {rng}, got {n}")
    return n


def _float(args, key):
    v = args[key]
    try:
        x = float(v)
    except ValueError:
        raise EngineError(f"{key} must be a number, got {v!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise EngineError(f"{key} must be finite, got {v!r}")
    return x


def process_escapes(text: str) -> str:
    """Process backslash escapes as llama.cpp's CLI does (common.cpp's string_process_escapes):
    \\n \\r \\t \\' \\" \\\\ and \\xHH (a byte; consecutive ones may form a UTF-8 character).
    Any other backslash is kept as it is."""
    if "\\" not in text:
        return text
    simple = {"n": b"\n", "r": b"\r", "t": b"\t", "'": b"'", '"': b'"', "\\": b"\\"}
    out, i, n = bytearray(), 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            e = text[i + 1]
            if e in simple:
                out += simple[e]
                i += 2
                continue
            hx = text[i + 2:i + 4]
            if e == "x" and len(hx) == 2 and all(h in "0123456789abcdefABCDEF" for h in hx):
                out.append(int(hx, 16))
                i += 4
                continue
        out += c.encode("utf-8", "surrogatepass")
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EngineError(f"\\x escapes in {text!r} do not form valid UTF-8 ({e.reason}); "
                          "pass --no-escape to take the text literally") from None


def _text(args, key):
    """The text of option/argument `key`, escapes processed unless --no-escape."""
    v = args[key]
    return v if v is None or args.get("--no-escape") else process_escapes(v)


def strict_json(v):
    """v with non-finite floats as the strings "inf", "-inf", "nan": JSON has no Infinity/NaN."""
    import math
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    return v


def print_json(obj) -> None:
    """Print obj as one line of strict JSON (see strict_json)."""
    print(json.dumps(strict_json(obj), allow_nan=False))


RUN_PROMPT = "Write a Python function that reverses a string."
RUN_MAX_TOKENS = 256
TRACE_PROMPT = "What is 2+2?"  # the prompt `apr trace` uses


def _load(args, threads=None, n_ctx=None):
    from engine.api import Engine
    return Engine.load(args["MODEL"], n_ctx=n_ctx, threads=threads, exact=bool(args.get("--exact")))


def _sampler(args):
    from engine.sampling import Sampler
    return Sampler(_float(args, "--temperature"), _int(args, "--top-k", 0), _float(args, "--top-p"),
                   _int(args, "--seed"))


def _hooks(args, eng, ids, generated: int = 0) -> dict | None:
    """The --patch/--steer/--ablate specs as forward hooks (None without any); the run computes
    the prompt's positions and those of up to `generated` - 1 decode steps."""
    patches, steers, ablations = (args.get(k) or [] for k in ("--patch", "--steer", "--ablate"))
    if not (patches or steers or ablations):
        return None
    from trace.interventions import build_hooks
    sha = _model_sha256(args, eng) if patches else None   # a patch's capture must be of this model
    return build_hooks(eng.config, len(ids), patches, steers, ablations, model_sha256=sha,
                       n_positions=len(ids) + max(generated - 1, 0))


def _model_sha256(args, eng) -> str:
    """The model file's sha256: pinned for known keys, else hashed."""
    from engine.fetch import DEFAULT_MODEL, MODELS
    from trace.capture import file_sha256
    key = args["MODEL"] or DEFAULT_MODEL
    return MODELS[key].sha256 if key in MODELS else file_sha256(eng.path)


def cmd_run(args) -> int:
    from engine.generate import GenStats, check_prompt
    max_tokens = _int(args, "--max-tokens", 1, 1_000_000)
    max_tokens = RUN_MAX_TOKENS if max_tokens is None else max_tokens
    threads = _int(args, "--threads", 1)
    n_ctx = _int(args, "--ctx", 1, 1 << 20)
    sampler = _sampler(args)
    eng = _load(args, threads, n_ctx)
    prompt = _text(args, "--prompt") if args["--prompt"] is not None else RUN_PROMPT
    ids = eng.prompt_ids(prompt, raw=args["--raw"])
    if not args["--raw"] and not eng.has_chat_template:
        print(f"{eng.path.name} has no chat template (a base model?): the prompt is sent as raw text",
              file=sys.stderr)
    check_prompt(ids, eng.n_ctx)
    hooks = _hooks(args, eng, ids, max_tokens)
    # load and kernel set-up on their own line, so that the prefill rate below is the forward's own
    kernel_s = eng.warm_up()
    print(f"loaded {eng.path.name} in {eng.load_seconds:.2f} s; kernels ready in {kernel_s:.2f} s",
          file=sys.stderr)
    stats = GenStats()
    dec = eng.tokenizer.stream_decoder()
    eog = eng.tokenizer.eog_ids
    for tok in eng.generate(ids, max_tokens=max_tokens, sampler=sampler, stats=stats, hooks=hooks):
        if tok not in eog:
            sys.stdout.write(dec.push(tok))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    sys.stdout.flush()
    print(f"prompt tokens: {stats.prompt_tokens}, prefill {stats.prefill_tok_s:.1f} tok/s, "
          f"generated {stats.generated} tokens, decode {stats.decode_tok_s:.1f} tok/s, "
          f"first token after {stats.first_token_s:.2f} s, stop: {stats.stop_reason}", file=sys.stderr)
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise EngineError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise EngineError("--ids is empty")
    return ids


def cmd_score(args) -> int:
    top = _int(args, "--top", 0, 1000)
    eng = _load(args, _int(args, "--threads", 1))
    if args["--ids"] is not None:
        ids = _parse_ids(args["--ids"])
        bad = [i for i in ids if not 0 <= i < eng.config.vocab]
        if bad:
            raise EngineError(f"--ids: token id {bad[0]} is out of range [0, {eng.config.vocab})")
    else:
        ids = eng.prompt_ids(_text(args, "--text"), raw=args["--raw"])
    hooks = _hooks(args, eng, ids)
    result = eng.new_session(n_ctx=max(eng.n_ctx, len(ids))).score(ids, top=top, hooks=hooks)
    if args["--json"]:
        print_json(result)
        return 0
    tok = eng.tokenizer
    for p in result["positions"]:
        piece = tok.token_bytes(result["ids"][p["pos"]]).decode("utf-8", "replace")
        nxt = "" if p["next_id"] is None else f"next {p['next_id']:>7} logp {p['logprob']:9.4f}"
        tops = " ".join(f"{t}:{l:.2f}" for t, l in p["top"])
        print(f"{p['pos']:5d} {piece!r:>16} {nxt:<31} top: {tops}")
    ppl = result["perplexity"]
    print(f"perplexity: {ppl:.4f}" if ppl is not None else "perplexity: n/a (one token)")
    return 0


def cmd_trace(args) -> int:
    from pathlib import Path
    from engine.fetch import MODELS, DEFAULT_MODEL
    from trace.capture import (capture, capture_generation, check_ids, check_out_dir, default_out_dir, format_stats, plan_for_model,
                               prepare_out_dir)
    from trace.plan import PlanError, parse_stages
    threads = _int(args, "--threads", 1)
    max_tokens = _int(args, "--max-tokens", 1, 1_000_000)
    sampler = _sampler(args)
    try:  # stage names need no model: fail before loading one
        stages = parse_stages(args["--stages"])
    except PlanError as e:
        raise EngineError(str(e)) from None
    engine_name = (args["--engine"] or "numgguf").lower()
    if engine_name not in ("numgguf", "llama.cpp"):
        raise EngineError(f"--engine must be numgguf or llama.cpp, got {args['--engine']!r}")
    if engine_name == "llama.cpp" and max_tokens is not None:
        raise EngineError("--max-tokens with --engine llama.cpp is not supported: llama.cpp does not sample here; "
                          "`bisect --max-tokens N` captures llama.cpp decoding our generated tokens")
    if engine_name == "llama.cpp":
        from trace.llama_capture import check_stages
        from trace.llama_graph import import_llama_cpp
        import_llama_cpp()
        check_stages(args["--stages"], stages)
    if args["--out"] is not None:
        check_out_dir(Path(args["--out"]), args["--force"])
    eng = _load(args, threads)
    prompt = _text(args, "--prompt") if args["--prompt"] is not None else TRACE_PROMPT
    ids = eng.prompt_ids(prompt, raw=args["--raw"])
    plan = plan_for_model(args["--stages"], args["--layers"], eng.config)
    check_ids(ids, eng.config)
    key = args["MODEL"] or DEFAULT_MODEL
    name = (key if key in MODELS else Path(key).stem) + ("-llama.cpp" if engine_name == "llama.cpp" else "")
    out = Path(args["--out"]) if args["--out"] is not None else default_out_dir(name)
    sha = _model_sha256(args, eng)
    hooks = _hooks(args, eng, ids, max_tokens or 0)
    if hooks and engine_name == "llama.cpp":
        raise EngineError("--patch/--steer/--ablate act on our forward; --engine llama.cpp takes none")
    prepare_out_dir(out, args["--force"])
    if engine_name == "llama.cpp":
        from trace.llama_capture import capture_llama
        manifest = capture_llama(eng.path, ids, plan, out, prompt, eng.config, with_stats=args["--stats"],
                                 model_sha256=sha, progress=sys.stderr.isatty(), n_threads=threads or 2)
    elif max_tokens is not None:
        dec, eog = eng.tokenizer.stream_decoder(), eng.tokenizer.eog_ids

        def stream(tok):
            if tok not in eog:
                sys.stdout.write(dec.push(tok))
                sys.stdout.flush()
        manifest = capture_generation(eng, ids, plan, out, prompt, max_tokens, sampler, with_stats=args["--stats"],
                                      model_sha256=sha, on_token=stream, hooks=hooks)
        sys.stdout.write(dec.flush() + "\n")
    else:
        manifest = capture(eng, ids, plan, out, prompt, with_stats=args["--stats"], model_sha256=sha,
                           progress=sys.stderr.isatty(), hooks=hooks)
    if args["--stats"]:
        print(format_stats(manifest))
    if max_tokens is not None:
        print(f"wrote {len(manifest['files'])} files for {manifest['n_tokens']} positions ({len(ids)} prompt + "
              f"{len(manifest['generated_ids'])} generated tokens, stop: {manifest['stop_reason']}) in "
              f"{manifest['forward_seconds']:.2f} s", file=sys.stderr)
    else:
        print(f"wrote {len(manifest['files'])} files for {len(ids)} tokens in {manifest['forward_seconds']:.2f} s",
              file=sys.stderr)
    print(out)
    return 0


def cmd_diff(args) -> int:
    from trace.aprt import AprtError
    from trace.diff import DiffError, diff_captures, format_report
    from trace.diff import DEFAULT_ATOL, DEFAULT_RTOL
    atol = DEFAULT_ATOL if args["--atol"] is None else _float(args, "--atol")
    rtol = DEFAULT_RTOL if args["--rtol"] is None else _float(args, "--rtol")
    for flag, v in (("--atol", atol), ("--rtol", rtol)):
        if v < 0:
            raise EngineError(f"{flag} must be >= 0, got {v:g}")
    try:
        report = diff_captures(args["PATH_A"], args["PATH_B"], atol=atol, rtol=rtol)
    except (AprtError, DiffError) as e:
        raise EngineError(str(e)) from None

    if args["--json"]:
        print_json(report.to_json())
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def cmd_bisect(args) -> int:
    import time
    from pathlib import Path
    from trace.bisect import format_report, plot_report, run_bisect, run_generation_bisect
    from trace.llama_graph import import_llama_cpp
    threads = _int(args, "--threads", 1)
    max_tokens = _int(args, "--max-tokens", 1, 1_000_000)
    against = args["--against"]
    if against not in ("llama.cpp", "prefill"):
        raise EngineError(f"--against must be llama.cpp or prefill, got {against!r}")
    if against == "prefill" and max_tokens is None:
        raise EngineError("--against prefill compares a generation's decode steps: give --max-tokens N")
    if against == "prefill" and args["--reference-model"] is not None:
        raise EngineError("--reference-model is llama.cpp's model; --against prefill uses MODEL itself")
    min_cos = None   # the runner's default for the mode
    if args["--min-cosine"] is not None:
        min_cos = _float(args, "--min-cosine")
    if min_cos is not None and not -1.0 <= min_cos <= 1.0:
        raise EngineError(f"--min-cosine must be between -1 and 1, got {min_cos:g}")
    tol = {}
    for flag in ("--atol", "--rtol"):
        tol[flag] = None if args[flag] is None else _float(args, flag)
        if tol[flag] is not None and tol[flag] < 0:
            raise EngineError(f"{flag} must be >= 0, got {tol[flag]:g}")
    plot = _plot_path(args)
    if against == "llama.cpp":
        import_llama_cpp()
    eng = _load(args, threads)
    kernel_s = eng.warm_up()   # kernels loaded before the timed captures
    print(f"loaded {eng.path.name} in {eng.load_seconds:.2f} s; kernels ready in {kernel_s:.2f} s", file=sys.stderr)
    ref = eng.path
    if args["--reference-model"] is not None:
        from engine.model import open_model
        ref = Path(args["--reference-model"])
        if not ref.is_file():
            raise EngineError(f"--reference-model {ref}: no such file")
        rcfg = open_model(ref)[1]
        fields = ("arch", "n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab", "qkv_bias")
        bad = [f for f in fields if getattr(rcfg, f, None) != getattr(eng.config, f, None)]
        if bad:
            raise EngineError(f"--reference-model {ref} does not have MODEL's shape: {bad[0]} "
                              f"{getattr(rcfg, bad[0], None)} vs {getattr(eng.config, bad[0], None)}")
    prompt = _text(args, "--prompt") if args["--prompt"] is not None else TRACE_PROMPT
    ids = eng.prompt_ids(prompt, raw=args["--raw"])
    if not ids:
        raise EngineError("the prompt has no tokens; nothing to compare")
    t0 = time.perf_counter()
    if max_tokens is not None:
        report = run_generation_bisect(eng, ids, prompt, max_tokens, against, ref, min_cos, tol["--atol"],
                                       tol["--rtol"], threads=threads or 2, progress=sys.stderr.isatty(),
                                       isolate=args["--isolate"])
    else:
        report = run_bisect(eng, ids, prompt, ref, min_cos, tol["--atol"], tol["--rtol"], threads=threads or 2,
                            progress=sys.stderr.isatty(), isolate=args["--isolate"])
    seconds = time.perf_counter() - t0
    report.info["seconds"] = round(seconds, 2)
    if args["--json"]:
        print_json(report.to_json())
    else:
        print(format_report(report))
    if plot is not None:
        where = "" if report.position is None else f", position {report.position}"
        mode = ", isolated layers" if args["--isolate"] else ""
        plot_report(report, plot, f"{Path(str(eng.path)).stem} vs {against} ({Path(str(ref)).name}), "
                                  f"{len(ids)} tokens{where}{mode}")
        print(f"plot: {plot}", file=sys.stderr)
    info = report.info
    n_tok = info["n_tokens"]
    ref_s = info.get("reference_seconds", info.get("llama_seconds"))
    print(f"bisect: {n_tok} tokens x {eng.config.n_layers} layers in {seconds:.1f} s (ours {info['ours_seconds']:.1f} s, "
          f"{against} {ref_s:.1f} s); temporary captures {info['peak_disk_bytes'] / 1e6:.1f} MB "
          "(removed)", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_tokenize(args) -> int:
    from engine.fetch import resolve_model
    from engine.gguf_reader import GGUFFile
    from engine.tokenizer import Tokenizer
    path = resolve_model(args["MODEL"])
    tok = Tokenizer.from_metadata(GGUFFile(path).metadata, source=str(path))
    from engine import failpoints
    special = args["--special"] and not failpoints.active("cli.tokenize_special")
    # like llama-tokenize: BOS (and EOS) included where the model adds them
    print(json.dumps(tok.encode(_text(args, "TEXT"), parse_special=special, add_special=True)))
    return 0


def cmd_fetch(args) -> int:
    from engine.fetch import MODELS, fetch
    keys = [args["KEY"]] if args["KEY"] else list(MODELS)
    for key in keys:
        print(fetch(key))
    return 0


def cmd_inspect(args) -> int:
    from engine.inspect import describe
    text, supported = describe(args["MODEL"])
    print(text)
    return 0 if supported else 1


def cmd_bench(args) -> int:
    from engine.api import Engine
    from engine.benchmark import FLASH_ATTN, format_bench, llama_available, run_bench
    prompt_tokens = _int(args, "--prompt-tokens", 1, 1 << 16)
    gen_tokens = _int(args, "--gen-tokens", 1, 1 << 16)
    repeat = _int(args, "--repeat", 1, 1000)
    threads = _int(args, "--threads", 1)
    ctx_fill = _int(args, "--ctx-fill", 1, 1 << 20) or 0
    flash_attn = args["--flash-attn"]
    if flash_attn not in FLASH_ATTN:
        raise EngineError(f"--flash-attn must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
    if flash_attn != "off" and not args["--vs-llama-cpp"]:
        raise EngineError("--flash-attn sets llama.cpp's attention: it needs --vs-llama-cpp")
    if args["--vs-llama-cpp"] and not llama_available():
        raise EngineError("--vs-llama-cpp needs llama-cpp-python (pip install llama-cpp-python==0.3.36)")
    eng = Engine.load(args["MODEL"], n_ctx=(ctx_fill or prompt_tokens) + gen_tokens + 8, threads=threads)
    log = None if args["--json"] else (lambda m: print(m, file=sys.stderr))
    result = run_bench(eng, prompt_tokens, gen_tokens, threads, repeat, vs_llama=args["--vs-llama-cpp"], log=log,
                       ctx_fill=ctx_fill, flash_attn=flash_attn, roofline=args["--roofline"])
    if args["--json"]:
        print_json(result)
    else:
        print(format_bench(result))
    return 0


def cmd_collect(args) -> int:
    from pathlib import Path
    from trace.collect import collect, collection_plan, import_ray
    from trace.plan import PlanError, parse_stages
    workers = _int(args, "--workers", 1, 4096)
    threads = _int(args, "--worker-threads", 1, 4096)
    shard_tokens = _int(args, "--shard-tokens", 1)
    max_prompt = _int(args, "--max-prompt-tokens", 1)
    use_ray = bool(args["--ray"] or args["--ray-address"])
    if use_ray:
        import_ray()   # before loading a model: say at once that Ray is missing
    try:
        parse_stages(args["--stages"])
    except PlanError as e:
        raise EngineError(str(e)) from None
    prompts = Path(args["--prompts"])
    if not prompts.is_file():
        raise EngineError(f"--prompts {prompts}: no such file")
    local = not use_ray and (workers or 1) == 1
    eng = _load(args, threads=(threads or os.cpu_count()) if local else None)
    plan = collection_plan(args["--stages"], args["--layers"], eng.config)
    out = Path(args["--out"])
    try:
        was_complete = bool(json.loads((out / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        was_complete = False   # new, or not a collection: collect() says which
    m = collect(eng, prompts, plan, out, raw=args["--raw"], max_prompt_tokens=max_prompt,
                shard_tokens=shard_tokens, workers=workers, threads=threads,
                ray_address=args["--ray-address"], use_ray=use_ray, model_sha256=_model_sha256(args, eng))
    c = m["counts"]
    if was_complete:
        print(f"the collection in {out} is already complete ({c['prompts']} prompts, {c['tokens']} tokens)",
              file=sys.stderr)
    else:
        run = m["runs"][-1]
        print(f"collected {c['prompts']} prompts ({c['tokens']} tokens; {c['truncated_prompts']} truncated, "
              f"{c['empty_skipped']} empty skipped) into {c['shards']} shards; this run {run['shards']} shards, "
              f"{run['tokens']} tokens in {run['seconds']:.1f} s ({run['tok_s'] or 0:.1f} tok/s); "
              f"{c['bytes_per_token']:.0f} bytes per token on disk", file=sys.stderr)
    print(out)
    return 0


def cmd_export(args) -> int:
    from trace.export import export
    r = export(args["COLLECTION"], args["--format"], args["--out"], force=args["--force"])
    print(f"wrote {r['tokens']} rows of {r['prompts']} prompts ({', '.join(r['columns'])}) as {r['format']}: "
          f"{r['bytes']} bytes", file=sys.stderr)
    print(r["path"])
    return 0


def _ray_address_argument(argv: list[str]) -> list[str]:
    """`collect ... --ray ADDRESS` as `--ray --ray-address ADDRESS` (docopt has no optional
    option arguments); ADDRESS is host:port, ray://..., or auto."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        out.append(a)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--ray" and nxt is not None and not nxt.startswith("-") and (":" in nxt or nxt == "auto"):
            out += ["--ray-address", nxt]
            i += 1
        i += 1
    return out


def cmd_contracts(args) -> int:
    from contracts.runner import main as contracts_main
    return contracts_main(args["NAMES"], mutate=args["--mutate"], as_json=args["--json"])


def cmd_patch(args) -> int:
    from trace.patching import format_sweep, parse_metric, patch_sweep, plot_sweep, sweep_layers
    from trace.plan import PlanError, parse_stages
    for flag in ("--clean", "--corrupt", "--stage", "--metric"):
        if args[flag] is None:
            raise EngineError(f"patch needs {flag}" + {"--clean": " TEXT (the prompt patched from)",
                              "--corrupt": " TEXT (the prompt patched into)", "--stage": " STAGE (e.g. post_ffn_residual)",
                              "--metric": ' "logit-diff TOKEN_A TOKEN_B"'}[flag])
    try:
        stages = parse_stages(args["--stage"])
    except PlanError as e:
        raise EngineError(f"--stage: {e}") from None
    if len(stages) != 1:
        raise EngineError(f"--stage {args['--stage']!r}: give one stage, not {len(stages)}")
    plot = _plot_path(args)
    eng = _load(args, _int(args, "--threads", 1))
    (stage,) = stages
    if stage == "qkv_bias" and not eng.config.qkv_bias:
        raise EngineError(f"--stage qkv_bias: this {eng.config.arch} model has no qkv_bias stage")
    layers = sweep_layers(stage, args["--layers"], eng.config.n_layers)
    metric = parse_metric(args["--metric"], eng.tokenizer, eng.config.vocab)
    clean = eng.prompt_ids(_text(args, "--clean"), raw=args["--raw"])
    corrupt = eng.prompt_ids(_text(args, "--corrupt"), raw=args["--raw"])
    result = patch_sweep(eng, clean, corrupt, stage, layers, metric, progress=sys.stderr.isatty())
    if args["--json"]:
        print_json({k: result[k] for k in ("layers", "positions", "clean", "corrupt", "recovered", "stage", "metric",
                                           "clean_ids", "corrupt_ids", "patched")})
    else:
        print(format_sweep(result, eng.tokenizer))
    if plot is not None:
        plot_sweep(result, eng.tokenizer, plot, f"activation patching: {eng.path.stem}")
        print(f"plot: {plot}", file=sys.stderr)
    return 0


def _plot_path(args):
    """--plot's path, checked before any work: matplotlib present, the folder there."""
    from pathlib import Path
    if not args["--plot"]:
        return None
    plot = Path(args["--plot"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EngineError("--plot needs matplotlib, an optional extra: pip install '.[plot]'") from None
    if not plot.parent.is_dir():
        raise EngineError(f"--plot {plot}: folder {plot.parent} does not exist")
    return plot


def cmd_lens(args) -> int:
    from trace.lens import format_lens, logit_lens, plot_lens
    from trace.plan import PlanError, parse_layers
    top = _int(args, "--top", 1, 1000)
    plot = _plot_path(args)
    eng = _load(args, _int(args, "--threads", 1))
    try:
        layers = parse_layers(args["--layers"], eng.config.n_layers)
    except PlanError as e:
        raise EngineError(str(e)) from None
    prompt = _text(args, "--prompt") if args["--prompt"] is not None else TRACE_PROMPT
    ids = eng.prompt_ids(prompt, raw=args["--raw"])
    if not ids:
        raise EngineError("the prompt has no tokens; nothing to read")
    result = logit_lens(eng, ids, layers, top=top)
    if args["--json"]:
        print_json(result)
    else:
        print(format_lens(result, eng.tokenizer))
    if plot is not None:
        plot_lens(result, eng.tokenizer, plot, f"logit lens: {eng.path.stem}")
        print(f"plot: {plot}", file=sys.stderr)
    return 0


COMMANDS = {"run": cmd_run, "score": cmd_score, "trace": cmd_trace, "diff": cmd_diff, "bisect": cmd_bisect, "lens": cmd_lens,
            "patch": cmd_patch,
            "tokenize": cmd_tokenize, "fetch": cmd_fetch, "bench": cmd_bench,
            "inspect": cmd_inspect, "collect": cmd_collect, "export": cmd_export, "contracts": cmd_contracts}


def main(argv=None) -> int:
    from docopt import DocoptExit, docopt
    real = argv is None   # the real command line, not a test calling main()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "collect" in argv[:1]:
        argv = _ray_address_argument(argv)
    try:
        args = docopt(__doc__, argv=argv, default_help=True)
    except DocoptExit:
        print("error: invalid command line; see `python -m cli --help` for usage", file=sys.stderr)
        return 2
    from engine.errors import Terminated, install_signal_handlers
    if real:  # own the process's signals
        install_signal_handlers()
    try:
        for name, fn in COMMANDS.items():
            if args[name]:
                return fn(args)
    except EngineError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1
    except OSError as e:  # the environment, not the input: a full disk, a missing permission
        print(f"error: {_one_line(e.strerror or e)}" + (f": {_one_line(e.filename)}" if e.filename else ""),
              file=sys.stderr)
        return 1
    return 2


def _one_line(x) -> str:
    return str(x).replace("\r", "\\r").replace("\n", "\\n")


from engine.errors import EngineError  # noqa: E402  (light import, after the env is set)

if __name__ == "__main__":
    sys.exit(main())

"""Side by side: this project against the official code (microsoft/distilled_decoding), same weights, same CPU.

    python benchmarks/compare_official.py --official /path/to/distilled_decoding [--rows var-dd1,var-decode]
                                          [--batch 1] [--repeats 3] [--warmup 1] [--threads 2]

Both sides are built from the SAME random weights: a first subprocess builds the official models with the
official initialisation (VQVAE: PyTorch default init; VAR / DD_Model: their init_weights; LlamaGen GPT / DD: their
constructors' init; VQ-16: default init) under a fixed seed and saves the state_dicts; each side then loads them
(ours with strict=True). Every timed call runs in its own fresh process (one per side per row per round), the two
sides alternating which goes first in each round, so that a noisy machine hurts both alike; a process builds its
models, runs `--warmup` untimed calls, then times one call. Reported: seconds per image (median and min over the
rounds), project / official ratio of the medians, the process CPU time per image (all threads; on a machine shared
with other jobs it moves far less than the wall time) and its ratio, and the peak RSS of the process (ru_maxrss).

Rows (B = the batch): VAR-d16 teacher (10 scales, cfg 2, top-k 900, top-p 0.95, + VQVAE decode), DD 1-step and
2-step (t_list 0 / 0,5, split 5, + decode), VQVAE decode of random tokens alone; LlamaGen-B teacher (256 tokens,
cfg 2, top-k 8000, + VQ-16 decode), DD 1-step and 2-step (t_list 0 / 0,80, split 80, + decode), VQ-16 decode alone.
fp32 on the CPU; `--decoder-dtype bfloat16` runs the project's VQ decoders as `sample.decoder_dtype: bfloat16` does
(dd.teacher.Teacher.decoder_precision), the official side unchanged.

The official checkout is only read: it is put on sys.path of the official worker processes, and the optional
packages it imports but never needs here (torchvision's save_image) are replaced by stubs at import time when they
are missing or broken. Nothing of it is copied into this repository.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
VAR_SAMPLING = dict(cfg=2.0, top_k=900, top_p=0.95)
LLAMAGEN_SAMPLING = dict(cfg=2.0, top_k=8000, top_p=1.0)
VAR_SPLIT, LLAMAGEN_SPLIT = 5, 80

ROWS = {  # name -> (family, what, description)
    "var-teacher": ("var", "teacher", "VAR-d16 teacher (10 scales, cfg 2, top-k 900, + decode)"),
    "var-dd1": ("var", "dd1", "VAR-d16 DD 1-step (+ decode)"),
    "var-dd2": ("var", "dd2", "VAR-d16 DD 2-step (t 0,5, + decode)"),
    "var-decode": ("var", "decode", "VAR VQVAE decode alone (tokens -> image)"),
    "llamagen-teacher": ("llamagen", "teacher", "LlamaGen-B teacher (256 tokens, cfg 2, top-k 8000, + decode)"),
    "llamagen-dd1": ("llamagen", "dd1", "LlamaGen-B DD 1-step (+ decode)"),
    "llamagen-dd2": ("llamagen", "dd2", "LlamaGen-B DD 2-step (t 0,80, + decode)"),
    "llamagen-decode": ("llamagen", "decode", "LlamaGen VQ-16 decode alone (tokens -> image)"),
}


# ------------------------------------------------------------------------------------ official side
def official_imports(official: Path, family: str) -> None:
    """Put the official family folder on sys.path; stub torchvision when it cannot be imported (only save_image is
    imported by the modules used here, and never called)."""
    folder = official / ("VAR" if family == "var" else "LlamaGen")
    if not folder.is_dir():
        raise SystemExit(f"compare_official: {folder} does not exist; --official must be a checkout of "
                         f"microsoft/distilled_decoding (with VAR/ and LlamaGen/)")
    sys.path[:0] = [str(folder)] + ([str(folder / "autoregressive")] if family == "llamagen" else [])
    try:
        import torchvision.utils  # noqa: F401
    except Exception:  # missing, or built for another torch (operator torchvision::nms does not exist)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")

        def save_image(*_, **__):
            raise RuntimeError("compare_official: torchvision stub, save_image is not available")
        utils.save_image = save_image
        stub.utils = utils
        sys.modules.update({"torchvision": stub, "torchvision.utils": utils})


def official_var(official: Path, with_teacher: bool, with_dd: bool):
    official_imports(official, "var")
    import torch
    from models.vqvae import VQVAE
    torch.manual_seed(SEED)
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4).eval()
    common = dict(vae_local=vae, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, drop_rate=0.,
                  attn_drop_rate=0., drop_path_rate=0.1 * 16 / 24, norm_eps=1e-6, shared_aln=False,
                  cond_drop_rate=0.1, attn_l2_norm=True, flash_if_available=False, fused_if_available=False)
    init = dict(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    var = dd = None
    if with_teacher:
        from models.var import VAR
        var = VAR(**common)
        var.init_weights(**init)
        var.eval()
    if with_dd:
        from models.dd import DD_Model
        dd = DD_Model(**common, n_d_embed_enable=True, layerwise_n_d_embed=True)
        dd.init_weights(**init)
        dd.eval()
    return vae, var, dd


def official_llamagen(official: Path, with_teacher: bool, with_dd: bool):
    official_imports(official, "llamagen")
    import torch
    import torch.nn.functional as F
    from tokenizer.tokenizer_image.vq_model import VQ_models
    torch.manual_seed(SEED)
    vq = VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8).eval()
    gpt_args = dict(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1, model_type="c2i")
    gpt = dd = None
    if with_teacher:
        from autoregressive.models.gpt import GPT_models
        gpt = GPT_models["GPT-B"](**gpt_args).eval()
    if with_dd:
        from autoregressive.models.dd import GPT_models as DD_models
        codebook = F.normalize(vq.quantize.embedding.weight.data, p=2, dim=-1)
        dd = DD_models["GPT-B"](**gpt_args, codebook_dim=8, codebook=codebook).eval()
    return vq, gpt, dd


def prepare(official: Path, family: str, out: Path) -> None:
    """Official models with the official initialisation -> state_dicts in `out` (one file per model)."""
    import torch
    build = official_var if family == "var" else official_llamagen
    tokenizer, teacher, dd = build(official, True, True)
    for name, model in (("tokenizer", tokenizer), ("teacher", teacher), ("dd", dd)):
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"{family}-{name}.pt")


# ------------------------------------------------------------------------------------ the timed calls
def seeded(torch):
    return torch.Generator().manual_seed(SEED)


def var_calls(side: str, what: str, official: Path, weights: Path, B: int, decoder_dtype: str):
    """(call, label) for one VAR row; call() produces B images."""
    import torch
    load = lambda name: torch.load(weights / f"var-{name}.pt", map_location="cpu")  # noqa: E731
    g = torch.Generator().manual_seed(SEED)
    labels = torch.randint(0, 1000, (B,), generator=g)
    patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    tokens = [torch.randint(0, 4096, (B, pn * pn), generator=g) for pn in patch_nums]
    noise = torch.randn(B, sum(pn * pn for pn in patch_nums), 32, generator=g)
    t_list = [0] if what == "dd1" else [0, VAR_SPLIT]
    if side == "official":
        vae, var, dd = official_var(official, what == "teacher", what in ("dd1", "dd2"))
        vae.load_state_dict(load("tokenizer"), strict=True)
        if what == "decode":
            return lambda: vae.idxBl_to_img(tokens, same_shape=True, last_one=True)
        if what == "teacher":
            var.load_state_dict(load("teacher"), strict=True)
            return lambda: var.autoregressive_infer_cfg(B=B, label_B=labels, g_seed=SEED, more_smooth=False,
                                                        **VAR_SAMPLING)
        dd.load_state_dict(load("dd"), strict=True)

        def official_dd():  # VAR/sample.py's loop and transfer_BLCv_to_B3HW
            x = noise
            for t in t_list:
                steps = torch.zeros([B]) + t
                x = dd.perturb_data(x, steps, noise)
                x = dd.get_final_sequence(*dd.final_predict(labels, x, steps), VAR_SPLIT)
            pns = dd.patch_nums[1:]
            f_hat, start = x.new_zeros(B, dd.Cvae, pns[-1], pns[-1]), 0
            for i, pn in enumerate(pns):
                h = x[:, start:start + pn * pn].transpose(1, 2).reshape(B, dd.Cvae, pn, pn)
                f_hat, _ = vae.quantize.get_next_autoregressive_input(i, len(pns), f_hat, h)
                start += pn * pn
            return vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
        return official_dd

    from dd.config import TeacherSampling
    from dd.models.dd_var import VARDD
    from dd.models.var import VAR, var_config_for_depth
    from dd.models.var_vqvae import VQVAE
    from dd.sampling import dd_sample, student_ops
    from dd.teacher import VarTeacher
    vae = VQVAE().eval()
    vae.load_state_dict(load("tokenizer"), strict=True)
    config = var_config_for_depth(16)
    if what == "teacher":
        var = VAR(config)
        var.load_state_dict(load("teacher"), strict=True)
    else:  # the teacher object only decodes here: its AR model on the meta device (no memory, no time)
        with torch.device("meta"):
            var = VAR(config)
    teacher = VarTeacher(vae, var, TeacherSampling(temperature=1.0, cfg_interval=-1, **VAR_SAMPLING))
    teacher.decoder_dtype = decoder_dtype
    if what == "decode":
        flat = torch.cat(tokens, dim=1)
        return lambda: teacher.decode_tokens(flat)
    if what == "teacher":
        return lambda: teacher.decode_tokens(teacher.sample_tokens(labels, generator=seeded(torch)))
    student = VARDD(config).eval()
    student.load_state_dict(load("dd"), strict=True)
    student.attach_codebook(vae.quantize.embedding.weight)
    ops = student_ops(student)
    return lambda: (teacher.decode_embeddings(dd_sample(ops, labels, noise, t_list, VAR_SPLIT)) + 1) / 2


def llamagen_calls(side: str, what: str, official: Path, weights: Path, B: int, decoder_dtype: str):
    import torch
    load = lambda name: torch.load(weights / f"llamagen-{name}.pt", map_location="cpu")  # noqa: E731
    g = torch.Generator().manual_seed(SEED)
    labels = torch.randint(0, 1000, (B,), generator=g)
    tokens = torch.randint(0, 16384, (B, 256), generator=g)
    noise = torch.randn(B, 256, 8, generator=g)
    t_list = [0] if what == "dd1" else [0, LLAMAGEN_SPLIT]
    if side == "official":
        vq, gpt, dd = official_llamagen(official, what == "teacher", what in ("dd1", "dd2"))
        vq.load_state_dict(load("tokenizer"), strict=True)
        shape = [B, 8, 16, 16]
        if what == "decode":
            return lambda: vq.decode_code(tokens, shape)
        if what == "teacher":
            from autoregressive.models.generate import generate
            gpt.load_state_dict(load("teacher"), strict=True)

            def official_teacher():  # sample_c2i.py
                torch.manual_seed(SEED)
                idx = generate(gpt, labels, 256, cfg_scale=LLAMAGEN_SAMPLING["cfg"], cfg_interval=-1,
                               temperature=1.0, top_k=LLAMAGEN_SAMPLING["top_k"], top_p=LLAMAGEN_SAMPLING["top_p"],
                               sample_logits=True)
                return vq.decode_code(idx, shape)
            return official_teacher
        dd.load_state_dict(load("dd"), strict=True)
        codebook = dd.codebook

        def official_dd():  # eval_fewstep.py's loop
            x = noise
            for t in t_list:
                steps = torch.zeros([B]) + t
                mask = (torch.arange(256).unsqueeze(0).expand(B, 256) >= steps.unsqueeze(1)).float()
                x_t = x * (1 - mask[:, :, None]) + noise * mask[:, :, None]
                gt_idx = (codebook[:, None, None, :] - x_t).square().sum(dim=-1).argmin(dim=0)
                x = dd.get_final_x_BLC(dd.final_predict(x_BLC=x_t, cond_idx=labels, timestep=steps, idx=gt_idx),
                                       LLAMAGEN_SPLIT)
            z = x.reshape(B, 16, 16, 8).permute(0, 3, 1, 2).contiguous()
            return (vq.decode(z) + 1) / 2
        return official_dd

    from dd.config import TeacherSampling
    from dd.models.dd_llamagen import LlamaGenDD, student_config
    from dd.models.llamagen import LlamaGenGPT, gpt_config
    from dd.models.llamagen_vq import VQ_CONFIGS, VQModel
    from dd.sampling import dd_sample, student_ops
    from dd.teacher import LlamaGenTeacher
    vq = VQModel(VQ_CONFIGS["VQ-16"]).eval()
    vq.load_state_dict(load("tokenizer"), strict=True)
    config = gpt_config("GPT-B")
    gpt = LlamaGenGPT(config)
    teacher = LlamaGenTeacher(vq, gpt, TeacherSampling(temperature=1.0, cfg_interval=-1, **LLAMAGEN_SAMPLING))
    teacher.decoder_dtype = decoder_dtype
    if what == "decode":
        return lambda: teacher.decode_tokens(tokens)
    if what == "teacher":
        gpt.load_state_dict(load("teacher"), strict=True)
        return lambda: teacher.decode_tokens(teacher.sample_tokens(labels, generator=seeded(torch)))
    student = LlamaGenDD(student_config(config), teacher.codebook).eval()
    student.load_state_dict(load("dd"), strict=True)
    ops = student_ops(student)
    return lambda: (teacher.decode_embeddings(dd_sample(ops, labels, noise, t_list, LLAMAGEN_SPLIT)) + 1) / 2


def worker(side: str, row: str, B: int, official: Path, weights: Path, warmup: int, decoder_dtype: str) -> dict:
    import torch
    family, what, _ = ROWS[row]
    builder = var_calls if family == "var" else llamagen_calls
    with torch.inference_mode():
        call = builder(side, what, official, weights, B, decoder_dtype)
        for _ in range(warmup):
            call()
        started, cpu_started = time.perf_counter(), time.process_time()
        images = call()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if images.shape[0] != B or not torch.isfinite(images).all():
        raise SystemExit(f"compare_official: {side} {row} gave {tuple(images.shape)} images or non-finite values")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------ driver
def run(cmd: list[str], threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__] + cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"compare_official: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of microsoft/distilled_decoding")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (one fresh process per side per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls in each process before the timed one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decoder-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="precision of the project's VQ decoders (sample.decoder_dtype); the official side is fp32")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "ROW", "B"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", metavar="FAMILY", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    official = args.official.resolve()
    if args.prepare:
        return prepare(official, args.prepare, args.weights)
    if args.worker:
        side, row, B = args.worker
        print(json.dumps(worker(side, row, int(B), official, args.weights, args.warmup, args.decoder_dtype)))
        return

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"compare_official: unknown rows {unknown}; choose from {list(ROWS)}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise SystemExit(f"compare_official: --batch takes comma-separated integers, got {args.batch!r}")
    if args.repeats < 1 or args.warmup < 0 or min(batches) < 1:
        raise SystemExit("compare_official: need --repeats >= 1, --warmup >= 0 and batch sizes >= 1")
    for family in ("var", "llamagen"):  # fail early on a bad checkout
        if not (official / ("VAR" if family == "var" else "LlamaGen")).is_dir():
            raise SystemExit(f"compare_official: {official} is not a microsoft/distilled_decoding checkout")

    # a killed run must not leave gigabytes of weights behind in the temporary folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("compare_official: terminated"))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dd-compare-") as tmp:
        weights = Path(tmp)
        for family in sorted({ROWS[r][0] for r in rows}):
            print(f"[compare] official initialisation of the {family} models", flush=True)
            run(["--official", str(official), "--prepare", family, "--weights", str(weights)], args.threads)
        results = {(r, b, s): [] for r in rows for b in batches for s in ("project", "official")}
        for round_ in range(args.repeats):
            for row in rows:
                for B in batches:
                    order = ("project", "official") if round_ % 2 == 0 else ("official", "project")
                    for side in order:
                        out = run(["--official", str(official), "--worker", side, row, str(B), "--weights",
                                   str(weights), "--warmup", str(args.warmup), "--decoder-dtype",
                                   args.decoder_dtype], args.threads)
                        result = json.loads(out.strip().splitlines()[-1])
                        results[(row, B, side)].append(result)
                        print(f"[compare] round {round_ + 1}/{args.repeats} {row} B={B} {side}: "
                              f"{result['seconds'] / B:.3f} s/img ({result['cpu_seconds'] / B:.3f} CPU-s/img), "
                              f"{result['rss_mb']:.0f} MB", flush=True)
    load_after = os.getloadavg()

    lines = ["| row | B | project s/img (median / min) | official s/img (median / min) | project / official "
             "| CPU-s/img project / official (median) | CPU ratio | peak RSS project / official (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for B in batches:
            med, low, cpu, rss = {}, {}, {}, {}
            for side in ("project", "official"):
                per_image = [r["seconds"] / B for r in results[(row, B, side)]]
                med[side], low[side] = statistics.median(per_image), min(per_image)
                cpu[side] = statistics.median(r["cpu_seconds"] / B for r in results[(row, B, side)])
                rss[side] = max(r["rss_mb"] for r in results[(row, B, side)])
            lines.append(f"| {ROWS[row][2]} | {B} | {med['project']:.3f} / {low['project']:.3f} | "
                         f"{med['official']:.3f} / {low['official']:.3f} | {med['project'] / med['official']:.2f} | "
                         f"{cpu['project']:.2f} / {cpu['official']:.2f} | {cpu['project'] / cpu['official']:.2f} | "
                         f"{rss['project']:.0f} / {rss['official']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    torch.set_num_threads(args.threads)
    from common import machine, write_section
    command = "python benchmarks/compare_official.py --official <checkout>" + "".join(
        f" --{k} {v}" for k, v in (("rows", args.rows), ("batch", args.batch), ("repeats", args.repeats),
                                   ("warmup", args.warmup), ("threads", args.threads)))
    if args.decoder_dtype != "float32":
        command += f" --decoder-dtype {args.decoder_dtype}"
    precision = ("fp32" if args.decoder_dtype == "float32"
                 else f"fp32 (the project's VQ decoders in {args.decoder_dtype})")
    body = (f"`{command}` — same random weights (official initialisation) in both codebases, {precision}, "
            f"{args.threads} threads, one fresh process per side per round (sides alternating), {args.warmup} "
            f"warm-up call(s) then one timed call per process; median and min over {args.repeats} round(s).\n"
            f"Machine: {machine()}. Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}"
            f" — on a loaded machine the wall times are inflated and noisy; read the interleaved ratios, and the CPU "
            f"seconds (process CPU time, all threads), which contention inflates much less than wall time.\n\n"
            + table)
    suffix = "" if args.decoder_dtype == "float32" else f"; project decoder {args.decoder_dtype}"
    write_section(f"Side by side with the official code ({', '.join(rows)}; B {args.batch}{suffix})", body)


if __name__ == "__main__":
    main()

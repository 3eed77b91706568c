"""The training loop (nanoGPT's, for both model kinds): AdamW, warmup + cosine learning rate,
gradient accumulation and clipping, mixed precision, periodic evaluation and checkpoints,
exact resume, DistributedDataParallel under torchrun, a clean stop on SIGINT/SIGTERM, and
steps with a non-finite loss or gradient skipped rather than applied."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from gpt import allocator, checkpointing, lora
from gpt.files import CheckpointError

from . import distributed as ddp
from . import precision
from . import state as ckpt
from .cleanup import Created
from .config import ConfigError, TrainConfig, get_lr
from .evaluation import final_accuracy, validation_loss
from .loss import compute_loss, count_tokens
from .nonfinite import BadSteps, TrainingDiverged, finite_weights, grad_norm, non_finite
from .pairs import exact_match
from .progress import Reporter
from .samples import default_prompts, describe, sample
from .setup import (
    add_lora,
    build_data,
    check_resumable,
    check_writable,
    make_optimizer,
    model_and_tokenizer,
    resolve_config,
    resume_adapters,
)
from .stop import StopFlag
from .summary import closing_lines, peak_memory

# Tests set this to a directory: every rank then writes a hash of its final weights there.
DEBUG_DUMP_ENV = "GPT_TRAIN_DEBUG_WEIGHTS_DIR"


def _threads(cfg: TrainConfig) -> int:
    if cfg.threads:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def train(overrides: dict, resume: bool = False) -> dict:
    """Run training; returns a summary (steps, losses, accuracy, timings, paths).

    overrides: TrainConfig fields set explicitly (with resume, on top of the saved run's)."""
    cfg, resume_path, saved = resolve_config(overrides, resume)
    created = Created(Path(cfg.out))
    d, device = ddp.setup(cfg.device)
    try:
        return _train(cfg, resume_path, saved, d, device, created)
    except (ConfigError, CheckpointError, KeyboardInterrupt):
        if d.is_main:  # a failed check leaves nothing behind (disarmed once training starts)
            created.undo()
        raise
    finally:
        ddp.cleanup()


def _train(
    cfg: TrainConfig,
    resume_path: Path | None,
    saved: dict | None,
    d: ddp.Dist,
    device: torch.device,
    created: Created,
) -> dict:
    out = Path(cfg.out)
    repairs: list[str] = []
    if d.is_main:
        check_writable(out)
        repairs = ckpt.recover(out)  # a run killed mid-write left these; nothing else writes here now
    if device.type == "cpu":
        torch.set_num_threads(_threads(cfg))
        allocator.keep_freed_memory()  # each step's activations, not faulted in afresh every step
    if cfg.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--dtype bfloat16: this GPU does not support it; use float16")

    raw, tok = model_and_tokenizer(cfg, resume_path, d.is_main, lambda: ddp.barrier(d))
    adapted = add_lora(raw, cfg)
    checkpointing.enable(raw, cfg.activation_checkpointing)  # per block, in training with grad
    if resume_path is not None and adapted:  # a LoRA run's base weights are --init-from's, unchanged
        resume_adapters(raw, saved, resume_path)
    elif resume_path is not None:
        check_resumable(raw, resume_path)
    raw.to(device)
    mcfg = raw.config
    data = build_data(cfg, tok, mcfg.block_size, d.rank, d.is_main, lambda: ddp.barrier(d))
    optimizer = make_optimizer(raw, cfg, device)
    precision.resolve(cfg, raw, device, d)  # --dtype auto, once: the saved settings keep the choice
    dtype = getattr(torch, cfg.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    step, best_val, tokens_seen = 0, math.inf, 0
    bad = BadSteps(cfg.max_bad_steps)
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank; initial weights did not
    if saved is not None:
        ckpt.load_optimizer_state(optimizer, saved["optimizer"])
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        step, best_val, tokens_seen = saved["step"], saved["best_val_loss"], saved.get("tokens_seen", 0)
        bad = BadSteps(cfg.max_bad_steps, saved.get("skipped_steps", 0), saved.get("bad_in_a_row", 0))
        ranks = saved["ranks"]
        if d.rank < len(ranks):  # a different world size leaves new ranks freshly seeded
            torch.set_rng_state(ranks[d.rank]["torch_rng"])
            if device.type == "cuda" and ranks[d.rank].get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ranks[d.rank]["cuda_rng"], device)
            data.train.load_state_dict(ranks[d.rank]["sampler"])

    model = torch.compile(raw) if cfg.compile else raw
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    if d.is_main:
        for warning in cfg.warnings():
            print(f"gpt-train: {warning}", file=sys.stderr, flush=True)
    title = f"{mcfg.arch} {mcfg.n_layer}L/{mcfg.n_head}H/{mcfg.n_embd}, block {mcfg.block_size}, {tok.name}"
    report = Reporter(
        out,
        start_step=step,
        max_iters=cfg.max_iters,
        enabled=d.is_main,
        quiet=cfg.quiet,
        title=title,
        tensorboard=cfg.tensorboard,
    )
    prompts = (
        cfg.sample_prompts
        if cfg.sample_prompts is not None
        else data.sample_prompts or default_prompts(cfg.model, data.accuracy_pairs)
    )
    report.say(f"data: {data.description}")
    if adapted:
        report.say(adapted)
    report.say(
        f"model: {title}, {raw.num_params() / 1e6:.2f}M parameters, on {device}"
        + (f" x {d.world_size} ranks" if d.enabled else "")
    )
    for msg in repairs:
        report.say(msg)
    if resume_path is not None:
        report.say(f"resuming from {resume_path} at step {step}")

    def to_device(batch):
        if device.type == "cpu":
            return batch
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)

    def accuracy(num_beams: int, stopping=lambda: False) -> float | None:
        raw.eval()
        try:  # decoding runs in the weights' own dtype: its KV cache is allocated in it
            return exact_match(raw, tok, data.accuracy_pairs, num_beams=num_beams, stopping=stopping)
        finally:
            raw.train()

    def show_samples(step: int) -> None:
        if not (cfg.sample_tokens and prompts and d.is_main):
            return
        raw.eval()
        try:
            samples = sample(raw, tok, prompts, cfg.sample_tokens, cfg.model, data.sample_stop)
        finally:
            raw.train()
        report.log({"kind": "sample", "step": step, "samples": samples})
        report.say(describe(samples))

    def require_finite_weights(step: int) -> None:
        # skipped steps should make this impossible; it is the last line before a checkpoint
        if not finite_weights(raw):
            report.close()
            raise TrainingDiverged(
                f"the weights are not finite at step {step}; nothing was saved, "
                f"and {ckpt.last_good_hint(out)}"
            )

    def plain_model():
        """What checkpoints hold: with LoRA, the adapters merged in (gpt.load reads it as is)."""
        return lora.merged(raw) if adapted else raw

    def save(step: int, val_loss: float | None) -> None:
        require_finite_weights(step)  # on every rank (they hold the same weights): all stop together
        rank_state = {
            "torch_rng": torch.get_rng_state(),
            "sampler": data.train.state_dict(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        ranks = ddp.gather(rank_state, d)
        if not d.is_main:
            return
        st = {
            "step": step,
            "best_val_loss": best_val,
            "tokens_seen": tokens_seen,
            "config": cfg.to_dict(),
            "ranks": ranks,
            "optimizer": ckpt.optimizer_state(optimizer),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "skipped_steps": bad.total,
            "bad_in_a_row": bad.in_a_row,
            "adapters": lora.adapters(raw) if adapted else None,
        }
        meta = {
            "step": step,
            "val_loss": _finite_or_none(val_loss),
            "tokens_seen": tokens_seen,
            "train_config": cfg.to_dict(),
        }
        ckpt.save_step(out, plain_model(), st, meta, cfg.keep_last, tokenizer=tok)

    def report_skip(step: int, why: str) -> None:
        report.log(
            {
                "kind": "skip",
                "step": step,
                "reason": f"non-finite {why}",
                "in_a_row": bad.in_a_row,
                "skipped_steps": bad.total,
            }
        )
        report.say(
            f"step {step}: non-finite {why}, update skipped ({bad.in_a_row} in a row, {bad.total} in all)"
        )
        if bad.too_many:
            report.close()
            raise TrainingDiverged(
                f"{bad.in_a_row} steps in a row, up to step {step}, had a non-finite loss or "
                f"gradient norm (--max-bad-steps {cfg.max_bad_steps}); stopped, "
                f"and {ckpt.last_good_hint(out)}"
            )

    summary: dict = {"out": str(out), "best": str(out / ckpt.BEST), "start_step": step, "evals": []}
    interrupted, started, saved_at = None, time.perf_counter(), step
    train_time, timed_steps = 0.0, 0
    window_t, window_steps, window_tokens, window_good = time.perf_counter(), 0, 0, 0
    loss_sum = torch.zeros((), device=device)
    raw.train()
    created.disarm()
    notice = "gpt-train: stopping at the next safe point to save a checkpoint"
    with StopFlag(notice if d.is_main else "") as stop:
        while step < cfg.max_iters:
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_tokens, step_loss = 0, torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = data.train.next_batch()
                step_tokens += count_tokens(batch, cfg.model)
                # all-reduce the gradients only on the last micro-step
                sync = nullcontext() if (not d.enabled or micro == cfg.grad_accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        loss = compute_loss(model, to_device(batch), cfg.model)
                    step_loss += loss.detach().float()
                    scaler.scale(loss / cfg.grad_accum).backward()
            scaler.unscale_(optimizer)  # the norm is measured (and clipped) unscaled; no-op without a scaler
            why = non_finite(step_loss, grad_norm(raw, cfg.grad_clip), scaler.is_enabled())
            # every rank must skip together, or their weights part ways; the gradients agree after
            # the all-reduce, but each rank's loss is its own
            skip = ddp.any_rank(why is not None, d)
            if not skip:
                scaler.step(optimizer)
                loss_sum += step_loss
                window_good += 1
                tokens_seen += step_tokens * d.world_size
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            window_tokens += step_tokens * d.world_size
            bad.record(skip)
            if skip:
                report_skip(step, why or "loss on another rank")

            rec = None
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                elapsed = time.perf_counter() - window_t
                train_time += elapsed
                timed_steps += window_steps
                rec = {
                    "kind": "train",
                    "step": step,
                    "loss": float(loss_sum) / (window_good * cfg.grad_accum) if window_good else None,
                    "lr": lr,
                    "ms_per_iter": 1000 * elapsed / window_steps,
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "skipped_steps": bad.total,
                }
                report.log(rec)
                loss_sum.zero_()
                window_t, window_steps, window_tokens, window_good = time.perf_counter(), 0, 0, 0
            report.step(step, rec)

            val_loss = None
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                paused = time.perf_counter()
                val_loss = validation_loss(
                    raw,
                    data.make_val,
                    cfg,
                    d,
                    step,
                    loss=compute_loss,  # looked up now: tests replace it
                    autocast=autocast,
                    to_device=to_device,
                    stopping=stop,
                    report=report,
                )
            if val_loss is not None:
                ev = {
                    "kind": "eval",
                    "step": step,
                    "val_loss": val_loss,
                    "val_ppl": math.exp(min(val_loss, 50.0)),
                    "elapsed_s": time.perf_counter() - started,
                }
                if data.accuracy_pairs and d.is_main and (greedy := accuracy(1, stop)) is not None:
                    ev["exact_match_greedy"] = greedy
                report.log(ev)
                summary["evals"].append(ev)
                msg = f"step {step}: val loss {val_loss:.4f}, perplexity {ev['val_ppl']:.2f}"
                if "exact_match_greedy" in ev:
                    msg += f", exact match (greedy) {100 * ev['exact_match_greedy']:.1f}%"
                report.say(msg)
                if not stop():
                    show_samples(step)
                if val_loss < best_val:  # never true for NaN
                    best_val = val_loss
                    require_finite_weights(step)
                    if d.is_main:
                        ckpt.save_best(
                            out,
                            plain_model(),
                            {"step": step, "val_loss": val_loss, "train_config": cfg.to_dict()},
                            tokenizer=tok,
                        )
                save(step, val_loss)
                saved_at = step
                report.plot()
                window_t += time.perf_counter() - paused  # evaluation time is not training time

            if ddp.any_rank(stop(), d):
                if saved_at != step:  # mid-interval, or the evaluation was cut short
                    save(step, None)
                interrupted = stop.signum if stop.signum is not None else signal.SIGTERM
                report.say(
                    f"stopped by signal at step {step}; checkpoint saved in {out}; "
                    f"continue with --resume --out {out}"
                )
                break

    if interrupted is None and data.accuracy_pairs and d.is_main:
        final_accuracy(summary, step, len(data.accuracy_pairs), cfg.num_beams, accuracy, report)
    plot = report.plot()
    report.close()
    summary["peak_memory"] = peak = peak_memory(device)
    for line in closing_lines(
        out, best_val, cfg.tensorboard, interrupted is not None, peak, cfg.chat_template
    ):
        report.say(line)
    if os.environ.get(DEBUG_DUMP_ENV):
        dump = Path(os.environ[DEBUG_DUMP_ENV])
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"rank{d.rank}.sha256").write_text(ckpt.weights_digest(raw))
    # leave together: a rank tearing down its process group while rank 0 is still writing
    # checkpoints and plots aborts in gloo ("terminate called without an active exception")
    ddp.barrier(d)
    summary.update(
        step=step,
        best_val_loss=best_val,
        interrupted=interrupted,
        plot=str(plot) if plot else None,
        ms_per_iter=1000 * train_time / max(timed_steps, 1),
        tokens_seen=tokens_seen,
    )
    return summary

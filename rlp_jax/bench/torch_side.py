"""The PyTorch peer: the same weights (exported with `hf.save_hf`) in HF transformers, timed on
the same shapes as the rlp-jax side. torch is imported only here, and only when asked for."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np

from rlp_jax.bench import jax_side, measure


def _block_cpu(_out: Any) -> None:  # CPU torch ops have finished when they return
    return None


def _block_cuda(_out: Any) -> None:
    import torch

    torch.cuda.synchronize()


class Peer:
    """An HF `AutoModelForCausalLM` (for the Nemotron-H hybrid: `NemotronHForCausalLM`, whose
    `generate` decodes on its own hybrid Mamba/attention cache) loaded from an rlp-jax export, with `threads` intra-op threads,
    on the GPU when torch sees one (a CUDA build of torch), else on the CPU."""

    def __init__(self, model, threads: int):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        self.threads = threads
        dtype = torch.bfloat16 if model.config.dtype == "bfloat16" else torch.float32
        from rlp_jax.models import convert

        with tempfile.TemporaryDirectory() as folder:  # a Transformer, or the hybrid (NemotronHForCausalLM)
            convert.save_hf(model, folder, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
            self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.block = _block_cuda if self.device == "cuda" else _block_cpu
        self.model.to(self.device).eval()
        self.dtype = dtype
        self.config = model.config  # the rlp-jax ModelConfig (FLOP formulas)

    def versions(self) -> dict[str, str]:
        import transformers

        return {"torch": self.torch.__version__, "transformers": transformers.__version__,
                "threads": self.threads, "device": self.device, "hf_class": type(self.model).__name__,
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None)}

    def max_logit_diff(self, model) -> float:
        """Same weights? The largest |logit difference| of one forward over a random sequence."""
        import jax.numpy as jnp

        tokens = np.random.RandomState(0).randint(3, model.config.vocab_size, (2, 16))
        ours = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(16), (2, 16)))
        with self.torch.no_grad():
            theirs = self.model(input_ids=self.torch.tensor(tokens, device=self.device)).logits.float().cpu().numpy()
        return float(np.abs(np.asarray(ours, np.float32) - theirs).max())

    def matmul_peak(self, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
        torch = self.torch
        out = {}
        for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            per_size = {}
            for n in sizes:
                a = torch.randn(n, n, dtype=dtype, device=self.device)
                b = torch.randn(n, n, dtype=dtype, device=self.device)
                t = measure.timeit(lambda: a @ b, repeats, block=self.block)
                per_size[str(n)] = 2.0 * n ** 3 / t.median_s / 1e9
            out[name] = {"gflops_by_size": per_size, "peak_gflops": max(per_size.values())}
        return out

    def fwd_bwd(self, prepared: jax_side.Prepared) -> dict[str, Any]:
        """The same loss as rlp-jax's update (clipped surrogate of the thought tokens at the
        sampling temperature, per-token entropy without gradient) on the same rollout rows:
        forward over `[context, <think>, thought]`, LM head only where thought tokens are scored
        (`logits_to_keep`), backward."""
        torch = self.torch
        s, mb = prepared.shapes, prepared.rows
        N, L = s.rows, s.thought
        as_tensor = lambda x, shape, dtype: torch.tensor(np.asarray(x).reshape(shape), dtype=dtype, device=self.device)
        seq = as_tensor(mb.seq_NxS, (N, -1), torch.long)
        thoughts = as_tensor(mb.thoughts_NxL, (N, L), torch.long)
        mask = as_tensor(mb.mask_NxL, (N, L), torch.float32)
        adv = as_tensor(mb.advantages_N, (N,), torch.float32)
        temperature = s.temperature
        model = self.model
        model.train()
        # Recompute activations in the backward exactly when rlp-jax does (its `--remat`).
        checkpointing = prepared.config.remat != "none"
        if checkpointing:  # newer transformers name it activation_checkpointing_*
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=seq, logits_to_keep=L + 1).logits[:, :L].float() / temperature
            log_probs = torch.log_softmax(logits, dim=-1)
            logp = log_probs.gather(-1, thoughts[..., None])[..., 0]
            with torch.no_grad():
                entropy = -(log_probs.exp() * log_probs).sum(-1)
            ratio = torch.exp(logp - logp.detach())
            a = adv[:, None]
            per_token = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
            loss = -((per_token * mask).sum(-1) / mask.sum(-1)).mean()
            loss.backward()
            return loss.item() + 0.0 * entropy.sum().item()

        t = measure.timeit(step, s.repeats, block=self.block)
        if checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()
        tokens = N * s.seq_len
        flops = measure.train_flops(prepared.config, N, s.seq_len, L)
        return {"gradient_checkpointing": checkpointing,
                "fwd_bwd": t.as_dict(), "fwd_bwd_tokens_per_s": tokens / t.median_s,
                "fwd_bwd_gflops": flops / t.median_s / 1e9}

    def prefill(self, prompts_BxP):
        """HF's prefill: the forward over the prompts with a fresh cache, logits at the last
        position only. Returns the model output (`.cache`, `.logits`)."""
        torch = self.torch
        with torch.no_grad():
            return self.model(input_ids=prompts_BxP, attention_mask=torch.ones_like(prompts_BxP), use_cache=True,
                              logits_to_keep=1)

    def decode_from(self, prompts_BxP, cache, new_tokens: int, temperature: float, seed: int = 0):
        """HF's decode: `generate` (sampling at `temperature`, no top-k / top-p, no stop token) of
        `new_tokens` tokens given `cache`, which holds all of each prompt but its last token, so
        that each of its forwards is one token: the last prompt token, then the sampled ones. It
        samples what `generate` from the bare prompts samples. Returns `[B, P + new_tokens]`."""
        torch = self.torch
        torch.manual_seed(seed)
        with torch.no_grad():
            return self.model.generate(
                input_ids=prompts_BxP, attention_mask=torch.ones_like(prompts_BxP), cache=cache, do_sample=True,
                temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                eos_token_id=None, pad_token_id=0)

    def decode(self, shapes: jax_side.Shapes, batch_size: int, seed: int = 0) -> dict[str, Any]:
        """HF's prefill and decode timed apart, as on the rlp-jax side: the prefill of the whole
        prompts (`prefill`), and the `decode_new` = n decode steps alone (`decode_from`), each call
        from a fresh copy of one cache of the first P − 1 prompt tokens, made outside the timed call."""
        import copy

        torch = self.torch
        rng = np.random.RandomState(seed)
        P, n = shapes.decode_prompt, shapes.decode_new
        prompts_BxP = torch.tensor(rng.randint(3, self.model.config.vocab_size, (batch_size, P)), device=self.device)
        t_prefill = measure.timeit(lambda: self.prefill(prompts_BxP), shapes.repeats, block=self.block)
        cache = self.prefill(prompts_BxP[:, :-1]).cache
        t_decode = measure.timeit(lambda fresh: self.decode_from(prompts_BxP, fresh, n, shapes.temperature, seed),
                                  shapes.repeats, setup=lambda: (copy.deepcopy(cache),), block=self.block)
        return jax_side.decode_result(self.config, batch_size, P, n, t_prefill, t_decode)

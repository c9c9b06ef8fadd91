"""The demo's second task (`rlp-jax demo --task carry`): 6-digit additions whose leading answer
digit hangs on a long carry chain (rlp_jax.data.demo_corpus). Built to need a thought, it does
not: compute-matched next-token training learns the leading digit directly (docs/ablations.md).

Same model, tokenizer and recipe as configs/demo.py; longer documents and thoughts. The worked
thought is 35 characters (6 columns), so thoughts get 40 tokens; the prompt is BOS + the 14
characters up to `=`. The warm-up is 250 steps (150 for `addition`), chosen on a first version of
the generator (chains of 0–5 columns): its greedy thoughts got 43% of 256 held-out leading digits
right after 150 steps, 53% after 250 and 97% after 400 (without a thought 34–36% at all three);
250 leaves RLP partly-right thoughts to learn from. With the bundled generator the 250-step
warm-ups of seeds 0–2 score 67%, 69% and 34% (512 positions; docs/ablations.md).
"""

from rlp_jax.configs import demo


def warmup_config():
    c = demo.warmup_config()
    c.data.demo_variant = "carry_worked"
    c.data.seq_len = 64  # BOS + 14 + <think> + 35 + </think> + 6 + EOS = 59 tokens
    c.train.steps = c.checkpoint.every_steps = 250
    return c


def get_config():
    c = demo.get_config()
    c.data.demo_variant = "carry_plain"
    c.data.max_context = 16  # BOS + "471596+215403=" is 15 tokens
    c.rlp.max_thought_len = 40  # the worked thought is 35 characters + </think>
    return c

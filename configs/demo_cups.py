"""The demo's state-tracking task (`rlp-jax demo --task cups`): a ball under 3 cups, 10 swaps, which
cup is it under (rlp_jax.data.demo_corpus). Without a thought the answer depends on every swap at
once; with one, each step is a 9-entry table.

Same model, tokenizer and recipe as configs/demo.py; the prompt is BOS + the 10 swaps + `=` (12
tokens), the worked thought the ball's cup after each swap (10 characters), so thoughts get 12
tokens. The warm-up is 100 steps: its thoughts are learnt in a sharp transition whose step depends
on the seed. Greedy thoughts got 512 held-out answers right 99%, 41% and 34% of the time after 100
steps for seeds 0, 1, 2, and 99%, 97% and 41% after 125 (without a thought 32–39%, chance being
33%), so 100 leaves RLP partly-right thoughts to learn from in two seeds of three.
"""

from rlp_jax.configs import demo


def warmup_config():
    c = demo.warmup_config()
    c.data.demo_variant = "cups_worked"
    c.data.seq_len = 32  # BOS + 11 + <think> + 10 + </think> + 1 + EOS = 26 tokens
    c.train.steps = c.checkpoint.every_steps = 100
    return c


def get_config():
    c = demo.get_config()
    c.data.demo_variant = "cups_plain"
    c.data.max_context = 12  # BOS + "lrolrrolol=" is 12 tokens
    c.rlp.max_thought_len = 12  # the worked thought is 10 characters + </think>
    return c

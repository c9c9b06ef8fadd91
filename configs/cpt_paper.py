"""The paper's compute-matched continued-pretraining (CPT) baseline for Qwen3-1.7B-Base.

Hatamizadeh et al. (arXiv 2510.01265) train it with Megatron-LM: next-token prediction on the
same documents as RLP, AdamW (β1 0.9, β2 0.95, weight decay 0.1), the learning rate decaying
1e-6 → 1e-7, batches of 6M tokens, context 8192. The shape of the decay is not stated; this
preset uses a cosine (`--config.train.schedule=linear` for the other common choice). Documents are
packed into full rows of 8192 tokens (`data.pack_documents`); a batch is 768 such rows (6.29M
real tokens, no padding: the nearest to 6M that divides over meshes of up to 256 devices).

`train.steps` is the compute match: take the T_flop an RLP run processed (its summary.json
`totals.flop_tokens`, or `rlp-jax plan`'s upper bound for a run not made yet) and divide by the
tokens of a step; 954 steps × 6.29M ≈ the paper's 6B CPT tokens for 200 RLP steps on 170M input
tokens.

Point the same three keys as configs/rlp_paper.py at files on every host (init.path, tokenizer,
data.corpus), and set the mesh for the hardware as the rlp_qwen3_* files do.
"""

from rlp_jax.configs import rlp_paper


def get_config():
    c = rlp_paper.get_config()  # the same model, dtypes, weights and corpus keys; the RLP keys go unused
    c.data.kind = "documents"
    c.data.seq_len = 8192
    c.data.pack_documents = True
    c.rlp.objective = "ntp"
    c.train.batch_tokens = 768 * 8192  # 6.29M tokens: 768 packed rows
    c.train.steps = 954  # ≈ 6B tokens
    c.train.learning_rate = 1e-6
    c.train.final_learning_rate = 1e-7
    c.train.schedule = "cosine"
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.weight_decay = 0.1
    c.checkpoint.every_steps = 5
    c.eval.num_positions = 0
    return c

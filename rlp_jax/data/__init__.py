"""rlp-jax's data layer: corpora, tokenizers, prompt positions and resumable grain pipelines.

    corpus = build_demo_corpus(data_dir, "plain")            # or build_local_corpus / open_corpus
    tokenizer = demo_tokenizer()                             # or HFTokenizer("tokenizer.json")
    config = PromptBatchConfig(batch_size=32, max_context=16, target_len=3,
                               positions=PositionConfig("marked", None,
                                                        marked_kinds=("answer_start",)))
    batches = prompt_batches(corpus, "train", tokenizer, config)
    batch = next(batches)                                    # a PromptBatch: context_BxT, ...
    state = batches.get_state()                              # JSON-serialisable; set_state()

See docs/data.md.
"""

from rlp_jax.data.batching import BatchIterator, document_batch_spec, prompt_batch_spec
from rlp_jax.data.corpus import (
    LOCAL_POSITION_KINDS,
    Corpus,
    build_local_corpus,
    find_built_corpora,
    local_corpus_fingerprint,
    open_corpus,
)
from rlp_jax.data.demo_corpus import (
    DEMO_POSITION_KINDS,
    DEMO_VARIANTS,
    DemoCorpusSpec,
    build_demo_corpus,
    demo_tokenizer,
    generate_demo_documents,
)
from rlp_jax.data.pipeline import (
    DocumentBatchConfig,
    PromptBatchConfig,
    document_batches,
    per_process_batch_size,
    prompt_batches,
    shard_indices,
    tokenized_documents,
)
from rlp_jax.data.positions import STRATEGIES, PositionConfig, position_rng, sample_positions
from rlp_jax.data.text_files import TXT_DOCUMENTS
from rlp_jax.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "BatchIterator", "document_batch_spec", "prompt_batch_spec",
    "LOCAL_POSITION_KINDS", "Corpus", "build_local_corpus", "find_built_corpora",
    "local_corpus_fingerprint", "open_corpus",
    "DEMO_POSITION_KINDS", "DEMO_VARIANTS", "DemoCorpusSpec", "build_demo_corpus",
    "demo_tokenizer", "generate_demo_documents",
    "DocumentBatchConfig", "PromptBatchConfig", "document_batches", "per_process_batch_size",
    "prompt_batches", "shard_indices", "tokenized_documents",
    "STRATEGIES", "PositionConfig", "position_rng", "sample_positions",
    "TXT_DOCUMENTS", "ByteTokenizer", "CharTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
]

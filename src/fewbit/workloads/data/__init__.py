"""The workloads' offline data sources, generated or read from installed packages and cached (:mod:`.cache`):
number phrases (:mod:`.numbers`), Bible verses and text through pysword (:mod:`.bible`), byte-level text
(:mod:`.text`), Fashion-MNIST with a digits fallback (:mod:`.images`), synthesized speech (:mod:`.speech`), and
sentencepiece tokenizers (:mod:`.tokenizer`)."""

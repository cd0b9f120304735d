"""The contracts every layer builds on: the precision configs, the ``Backend`` protocol and its registry, the
precision-pass registry. They import nothing from the implementations (export/, quantize/, runtime/,
pipeline, bench/); the implementations register themselves here (docs/ARCHITECTURE.md, "Layers")."""

"""PyTorch instrumentation, ``provscope.watch(model)``: hooks on sampled steps, step
boundaries (``watch``), on-device statistics (``stats``), layer selection and the model
entity (``model``). Importing this package imports torch; nothing else in the core does."""

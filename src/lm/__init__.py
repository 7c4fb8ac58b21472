"""The model package: what finsynth does with a causal language model, whoever asks.

- :mod:`lm.config`: ``ModelConfig``, the one config section read here;
- :mod:`lm.packaged`: the models shipped inside PyPI packages (Gemma-3-270M, MiniLM), resolved offline;
- :mod:`lm.causal_lm`: the one loader (safetensors, dtype, 4-bit, adapters), the one generation loop,
  choice log-likelihoods, the training attention kernels and the CPU's fast paths.

``datagen`` (the ``local`` provider, the format stage) and ``training`` (training, evaluation, export,
chat) both use it; it imports neither (``tests/test_packaging.py`` checks), so a model change never
drags in a stage and a stage's code hash covers the model code it runs (``flows.stages.PROJECT_PACKAGES``).
"""

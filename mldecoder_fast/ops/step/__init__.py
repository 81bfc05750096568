"""The head's training step (docs/design.md steps 1-7) as one autograd function with a hand-written
backward: ``function.py`` (``HeadTrainStep``), ``records.py`` (its kit, parameters, weights and
configuration), ``attention.py`` (its cross-attention, three ways), ``dropout_masks.py`` (its
masks, stored or regenerated). Which kit runs where: ``mldecoder_fast/paths/train_step.py``."""

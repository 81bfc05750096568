"""Generated data sets, no download needed: ``digits`` (the multi-label demo's digit mosaics),
``imagenet21k`` (list files over 21,843 classes for the single-label recipe), ``nus_miniature``
(the ZSL recipe's files in miniature)."""

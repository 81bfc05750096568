"""The head itself: its configuration and input checks, the reference ``MLDecoder`` (the oracle),
``MLDecoderFast`` (fast.py), what it derives from its weights (caches.py), and which backend runs
(backends.py). How a forward of ``MLDecoderFast`` runs: ``mldecoder_fast/paths/``."""

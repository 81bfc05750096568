"""The command line of each training recipe: ``multilabel``, ``singlelabel``, ``zsl``, each with
``register(recipes)`` (its parser under ``mldecoder-fast train``) and ``run(args)``."""

"""Experiments over whole runs: BiSSL replicates and their compute-matched continuations
(:mod:`~bissl_kit.experiments.replicates`), a comparison as a job graph (:mod:`~bissl_kit.experiments.jobs`),
the test over replicates (:mod:`~bissl_kit.experiments.replication`) and sweeps of any config field
(:mod:`~bissl_kit.experiments.sweep`)."""

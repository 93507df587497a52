"""What the tests (and bench/) share: paths and polling (common), process spawning, commands and training runs
(dist_workers, train_helpers, parity_main, phema_workers), real services to test against (netns_cluster,
slurm_cluster, s3_server, multinode_helpers), independent references (plan_reference, inception_net,
fuzz_helpers) and stand-in feature extractors (feature_nets)."""

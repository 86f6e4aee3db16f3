"""The lab: training, data, evaluation, benchmarks and plots; nothing the server imports."""

from .job import JobConfig, SIGMA_ALGORITHMS

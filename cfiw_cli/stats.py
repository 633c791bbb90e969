"""Small statistics used in reports: the Wilson score interval, standard errors, Student's t quantiles."""

from __future__ import annotations

import functools
import math
import statistics

Z_95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved at 0 and 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, center - half)  # exact bounds, not 1e-17 off
    high = 1.0 if successes >= n else min(1.0, center + half)
    return (low, high)


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); 0 for n < 2."""
    if not values:
        return (math.nan, math.nan)
    mean = statistics.fmean(values)
    return (mean, statistics.stdev(values, mean) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


@functools.cache  # a report asks for the same few degrees of freedom many times
def t_quantile(probability: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom (probability > 0.5), by bisection
    on its distribution function, which is integrated with Simpson's rule (error < 1e-6)."""
    if df < 1 or not 0.5 < probability < 1:
        raise ValueError("t_quantile needs df >= 1 and 0.5 < probability < 1")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def central_mass(x: float, intervals: int = 2000) -> float:  # P(0 < T < x)
        h = x / intervals
        odd = sum(density((2 * i - 1) * h) for i in range(1, intervals // 2 + 1))
        even = sum(density(2 * i * h) for i in range(1, intervals // 2))
        return h / 3 * (density(0.0) + 4 * odd + 2 * even + density(x))

    low, high = 0.0, 1.0
    while central_mass(high) < probability - 0.5:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if central_mass(middle) < probability - 0.5 else (low, middle)
    return (low + high) / 2

"""Power-function EMA and post-hoc reconstruction, the math only (float64 numpy, no torch).

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3 and appendix C.
The power-function EMA at training time t averages the weights theta(tau), 0 <= tau <= t, with the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)

whose relative standard deviation (std / t) is sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): a length that scales
with training time. Tracked step by step with beta = (1 - batch / t)^(gamma + 1), t the images seen after the step:
the weight the average gives the step ending at t_k is (t_k^(gamma+1) - t_(k-1)^(gamma+1)) / t^(gamma+1), exactly the
profile's mass over that step (the weights are constant within it), whatever the batch size of each step.

Post-hoc: snapshots of a few such averages (profiles (t_i, gamma_i)) combine into any other profile (t, gamma) as
the least-squares fit sum_i x_i p_(t_i, gamma_i) ~ p_(t, gamma) in L2 over tau: the Gram system G x = b with the
closed-form inner products of power-function profiles below."""

from __future__ import annotations

import numpy as np

MAX_STD = 0.28  # gamma -> 0 (a plain average) is std 1/sqrt(12) = 0.2887; EDM2 stays below it


def exp_to_std(gamma) -> np.ndarray:
    """Relative standard deviation of the profile with exponent gamma."""
    g = np.float64(gamma)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def std_to_exp(std) -> np.ndarray:
    """The exponent gamma whose profile has relative standard deviation `std` (in (0, 1/sqrt(12))).

    std^-2 = (g + 2)^2 (g + 3) / (g + 1)  <=>  g^3 + 7 g^2 + (16 - s) g + (12 - s) = 0 with s = std^-2; the cubic
    has one root above -1 (the largest real one)."""
    std = np.asarray(std, dtype=np.float64)
    s = std.reshape(-1) ** -2.0
    roots = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]) for v in s]
    gamma = [r[np.abs(r.imag) < 1e-9].real.max() for r in roots]
    return np.asarray(gamma, dtype=np.float64).reshape(std.shape)


def power_beta(gamma: float, images: float, batch: float) -> float:
    """Decay of one step of `batch` images that ends at `images` seen: (1 - batch / images)^(gamma + 1); 0 at the
    first step, so the average starts from the first weights whatever it held before."""
    return float((1.0 - batch / images) ** (gamma + 1.0))


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_(t_a, gamma_a), p_(t_b, gamma_b)> = integral over tau of their product (broadcasting).

    With t_a <= t_b: (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_b) * (t_a / t_b)^g_b; symmetric otherwise."""
    t_a, g_a, t_b, g_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    a_first = t_a <= t_b
    t_lo, t_hi = np.where(a_first, t_a, t_b), np.where(a_first, t_b, t_a)
    g_hi = np.where(a_first, g_b, g_a)  # the exponent of the longer profile
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def solve_coefficients(in_images, in_stds, out_images, out_stds) -> np.ndarray:
    """Least-squares coefficients [len(in), len(out)]: column j combines the snapshot profiles (in_images[i],
    in_stds[i]) into the profile (out_images[j], out_stds[j]). Each column is scaled to sum to 1 (an average of
    weights stays an average); when the target is one of the snapshots, its column is that snapshot exactly."""
    t_in, s_in = (np.asarray(v, dtype=np.float64).reshape(-1) for v in np.broadcast_arrays(in_images, in_stds))
    t_out, s_out = (np.asarray(v, dtype=np.float64).reshape(-1) for v in np.broadcast_arrays(out_images, out_stds))
    g_in, g_out = std_to_exp(s_in), std_to_exp(s_out)
    gram = profile_inner(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    rhs = profile_inner(t_in[:, None], g_in[:, None], t_out[None, :], g_out[None, :])
    x = _solve_gram(gram, rhs)
    return x / x.sum(axis=0, keepdims=True)


def _solve_gram(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """G x = b, G symmetric positive (semi)definite: dense snapshots make it ill-conditioned, so symmetric scaling
    first (unit diagonal) and, should it still be singular, the least-squares minimum-norm solution."""
    d = 1.0 / np.sqrt(np.diag(gram))
    scaled = gram * d[:, None] * d[None, :]
    try:
        y = np.linalg.solve(scaled, rhs * d[:, None])
    except np.linalg.LinAlgError:
        y = np.linalg.lstsq(scaled, rhs * d[:, None], rcond=None)[0]
    return y * d[:, None]


def fit_error(in_images, in_stds, out_image: float, out_std: float, coefficients) -> float:
    """Relative L2 error of the fitted profile, ||sum_i x_i p_i - p|| / ||p|| (closed form): how well the snapshots
    can express the target, before any weights are read."""
    t_in, s_in = (np.asarray(v, dtype=np.float64).reshape(-1) for v in np.broadcast_arrays(in_images, in_stds))
    x = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    g_in, g = std_to_exp(s_in), float(std_to_exp(out_std))
    gram = profile_inner(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    rhs = profile_inner(t_in, g_in, out_image, g)
    target = float(profile_inner(out_image, g, out_image, g))
    sq = x @ gram @ x - 2 * x @ rhs + target
    return float(np.sqrt(max(sq, 0.0) / target))

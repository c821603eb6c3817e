"""A data distribution whose flow-matching velocity is known in closed form: a Gaussian mixture.

With x_t = (1−t)·x0 + t·ε, x0 ~ Σ_k π_k N(μ_k, Σ_k) and ε ~ N(0, I), component k gives
x_t ~ N((1−t)μ_k, C_k) with C_k = (1−t)²Σ_k + t²I, and

    E[ε | x_t, k]  = t·C_k⁻¹ (x − (1−t)μ_k)
    E[x0 | x_t, k] = μ_k + (1−t)·Σ_k C_k⁻¹ (x − (1−t)μ_k)
    v(x, t) = E[ε − x0 | x_t = x] = Σ_k p(k | x_t) (E[ε | x_t, k] − E[x0 | x_t, k]).

This is the exact velocity a perfect model would learn, which lets tests check samplers against the
known target (and lets users sanity-check a sampler configuration: ``flowalign check-sampler``).
"""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, D]
        self.covs = torch.as_tensor(covs, dtype=torch.float64)  # [K, D, D]
        K, D = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, D, D):
            raise ValueError("weights [K], means [K, D] and covs [K, D, D] must agree")
        if abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ValueError("mixture weights must sum to 1")
        self.dim = D

    @classmethod
    def default(cls) -> "GaussianMixture":
        """Three well-separated, unequal, anisotropic components in 2-D (used by tests and the CLI)."""
        return cls(
            weights=[0.5, 0.3, 0.2],
            means=[[-2.0, 0.0], [2.0, 1.5], [1.0, -2.5]],
            covs=[
                [[0.30, 0.10], [0.10, 0.20]],
                [[0.15, 0.00], [0.00, 0.40]],
                [[0.20, -0.05], [-0.05, 0.10]],
            ],
        )

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n data samples [n, D] (float64) and their component labels [n]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covs)  # [K, D, D]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + torch.einsum("nij,nj->ni", L[k], z), k

    def _component_terms(self, x: torch.Tensor, t: torch.Tensor):
        """Per-component log p(x_t, k), E[ε|x_t,k] and E[x0|x_t,k] for x [N, D], t [N]."""
        x = x.double()
        t = t.double().reshape(-1, 1, 1, 1)  # [N,1,1,1]
        eye = torch.eye(self.dim, dtype=torch.float64)
        C = (1 - t) ** 2 * self.covs[None] + t**2 * eye  # [N, K, D, D]
        r = x[:, None, :] - (1 - t[..., 0]) * self.means[None]  # [N, K, D]
        Cinv_r = torch.linalg.solve(C, r.unsqueeze(-1)).squeeze(-1)  # [N, K, D]
        logdet = torch.logdet(C)  # [N, K]
        log_joint = (
            torch.log(self.weights)[None]
            - 0.5 * (r * Cinv_r).sum(-1)
            - 0.5 * logdet
            - 0.5 * self.dim * math.log(2 * math.pi)
        )
        e_eps = t[..., 0] * Cinv_r
        e_x0 = self.means[None] + (1 - t[..., 0]) * torch.einsum("kij,nkj->nki", self.covs, Cinv_r)
        return log_joint, e_eps, e_x0

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact v(x, t) = E[ε − x0 | x_t = x] for x [N, D] and t [N] (or a scalar); returns x's dtype."""
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        log_joint, e_eps, e_x0 = self._component_terms(x, t)
        post = torch.softmax(log_joint, dim=1)  # [N, K]
        return (post[..., None] * (e_eps - e_x0)).sum(1).to(x.dtype)

    def responsibilities(self, x0: torch.Tensor) -> torch.Tensor:
        """p(k | x0) for data-space samples [N, D] → [N, K] (to attribute samples to components)."""
        log_joint, _, _ = self._component_terms(x0, torch.zeros(x0.shape[0]))
        return torch.softmax(log_joint, dim=1)

    def component_stats(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mass, mean and covariance of each component as seen in samples x0 [N, D], assigning
        each sample to its most likely component."""
        k = self.responsibilities(x0).argmax(1)
        x0 = x0.double()
        K = len(self.weights)
        mass = torch.bincount(k, minlength=K).double() / len(k)
        means = torch.stack([x0[k == j].mean(0) for j in range(K)])
        covs = torch.stack([torch.cov(x0[k == j].T) for j in range(K)])
        return {"mass": mass, "means": means, "covs": covs}

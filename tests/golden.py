"""Published reference values the tests check against, each stated once.

TIMESTEPS: DESIGN.md section 3's rule (the first t with sqrt(alpha_bar_t) <= 1/sqrt(1 + 4 sigma^2))
evaluated by hand on the original ADM schedules, for sigma = 0.25, 0.5, 1.0: the table of
Carlini et al. 2023 / the issue that introduced the diffusion maths.
"""
TIMESTEPS = {
    ("linear", 1000): {0.25: 145, 0.5: 259, 1.0: 396},
    ("squaredcos_cap_v2", 4000): {0.25: 1158, 0.5: 1984, 1.0: 2809},
}

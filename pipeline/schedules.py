"""The cascade schedules' names: which walk and which per-level budgets certify a cascade.

Names only, without scipy, so that validating a config (and a no-op re-run that only does that)
stays cheap; :mod:`pipeline.certification` and :mod:`pipeline.sequential` implement them.
"""
FALLTHROUGH = "bonferroni-fallthrough"  # bonferroni's bounds; an UNDECIDED level falls through
SCHEDULES = ("bonferroni", FALLTHROUGH, "paper")
CASCADE_SCHEDULES = ("bonferroni", FALLTHROUGH)  # the sequential cascade's walks, both with bonferroni's budgets

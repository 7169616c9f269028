"""Plate QC: assay quality from per-well values and the plate map.

The statistics are CellProfiler's CalculateStatistics ones (Z'-factor,
V-factor, EC50; Zhang et al. 1999, Ravkin 2004), computed the same way so a
plate's numbers equal what that module reports for the same values:

* Observations are grouped by their control value. With numeric controls
  (BBBC013's ``SBS_Controls``: -1 negative, 0 sample, 1 positive) the lowest
  value is the negative and the highest the positive control, as
  CalculateStatistics takes the extremes of the sorted labels; text roles
  (``negcon``/``poscon``/``trt`` as in JUMP plate maps, ``negative``,
  ``positive``, ...) are mapped to -1, 1 and 0 first.
* Each group's mean and population standard deviation (ddof 0; a group of
  one observation has deviation 0).
* ``Z' = 1 - 3 (sd_neg + sd_pos) / |mean_neg - mean_pos|``; when the means are
  equal the quotient's numerator is taken as 1 and the range as 1e-6.
* ``V = 1 - 6 mean(sd per dose) / (max - min of the means per dose)``, over
  every distinct dose (the controls' doses included), with the same rule for
  a zero range. Without doses the control values stand in for them (then V
  equals Z').
* EC50: a four-parameter sigmoid ``min + (max - min) / (1 + (dose / ec50) ** hill)``
  fitted by Nelder-Mead least squares from CalculateStatistics' starting
  point (minimum and maximum response; the dose whose response is nearest
  the middle, or the middle of the dose range when that is an end; hill -1
  when the response rises with dose, else 1).

A value that is not finite makes that feature's statistics NaN, as in
CellProfiler.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]

NEGATIVE_ROLES = frozenset(
    {"negcon", "negative", "neg", "negative_control", "control_negative", "dmso", "neg_ctrl"}
)
POSITIVE_ROLES = frozenset({"poscon", "positive", "pos", "positive_control", "control_positive", "pos_ctrl"})
SAMPLE_ROLES = frozenset({"trt", "treatment", "sample", "compound", "", "empty", "none"})

#: Plate map columns taken as the control role and as the dose, when the
#: report's settings do not name them (first match, case-insensitive, after
#: the Metadata_ prefix).
CONTROL_COLUMNS = ("controls", "control", "sbs_controls", "control_type", "pert_type", "role", "control_role")
DOSE_COLUMNS = ("doses", "dose", "sbs_doses", "concentration", "mmoles_per_liter", "pert_dose", "dose_um")


class QcError(ValueError):
    """The plate map cannot give what QC needs; the message says what."""


def control_codes(values: Sequence[str]) -> npt.NDArray[np.float64]:
    """Control values as numbers: numeric ones as they are, roles mapped to
    -1 (negative), 1 (positive), 0 (sample); NaN where a well has none."""
    out = np.full(len(values), np.nan)
    numeric = all(_is_number(v) for v in values if v.strip())
    for i, v in enumerate(values):
        t = v.strip()
        if not t:
            continue
        if numeric:
            out[i] = float(t)
        elif t.lower() in NEGATIVE_ROLES:
            out[i] = -1.0
        elif t.lower() in POSITIVE_ROLES:
            out[i] = 1.0
        elif t.lower() in SAMPLE_ROLES:
            out[i] = 0.0
        else:
            raise QcError(
                f"control role {v!r} is neither a number nor one of "
                f"{sorted(NEGATIVE_ROLES | POSITIVE_ROLES | SAMPLE_ROLES - {''})}"
            )
    return out


def doses(values: Sequence[str]) -> npt.NDArray[np.float64]:
    """Doses as numbers, NaN where a well has none; a dose that is not a number is refused."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if v.strip():
            if not _is_number(v):
                raise QcError(f"dose {v!r} is not a number")
            out[i] = float(v)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _groups(labels: npt.NDArray[np.float64], data: Matrix) -> tuple[npt.NDArray[np.float64], Matrix, Matrix]:
    """(distinct labels ascending, mean per label, population sd per label)."""
    distinct = np.unique(labels)
    means = np.zeros((len(distinct), data.shape[1]))
    sds = np.zeros_like(means)
    for i, label in enumerate(distinct):
        rows = data[labels == label]
        if rows.shape[0] == 1:
            means[i] = rows[0]
        else:
            means[i] = rows.mean(axis=0)
            sds[i] = rows.std(axis=0)
    return distinct, means, sds


def z_factors(controls: npt.NDArray[np.float64], data: Matrix) -> Matrix:
    """Z' of every column of `data` (observations x features) from the
    observations' control values (the lowest and the highest one)."""
    _, means, sds = _groups(controls, data)
    spread = sds[0] + sds[-1]
    gap = np.abs(means[0] - means[-1])
    flat = gap == 0
    spread[flat] = 1.0
    gap[flat] = 1e-6
    return np.asarray(1.0 - 3.0 * spread / gap, dtype=np.float64)


def v_factors(dose: npt.NDArray[np.float64], data: Matrix) -> Matrix:
    """V-factor of every column of `data` from the observations' doses."""
    _, means, sds = _groups(dose, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gap = means.max(axis=0) - means.min(axis=0)
    flat = gap == 0
    spread = np.where(flat, 1.0, sds.mean(axis=0))
    gap = np.where(flat, 1e-6, gap)
    return np.asarray(1.0 - 6.0 * spread / gap, dtype=np.float64)


def sigmoid(
    params: Sequence[float] | npt.NDArray[np.float64], x: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    bottom, top, ec50, hill = params
    with np.errstate(all="ignore"):
        return np.asarray(bottom + (top - bottom) / (1.0 + (x / ec50) ** hill), dtype=np.float64)


def _start(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> list[float]:
    low, high = float(np.min(y)), float(np.max(y))
    nearest = x[int(np.argmin(np.abs(y - (low + high) / 2)))]
    middle = nearest if nearest not in (np.min(x), np.max(x)) else (np.min(x) + np.max(x)) / 2
    hill = -1.0 if y[int(np.argmax(x))] > y[int(np.argmin(x))] else 1.0
    return [low, high, float(middle), hill]


def ec50(dose: npt.NDArray[np.float64], data: Matrix, log_dose: bool = False) -> Matrix:
    """(features x 4) fitted (bottom, top, EC50, hill) of every column."""
    import scipy.optimize

    x = np.log(dose) if log_dose else dose
    if np.min(x) == np.max(x):
        raise QcError("every well has the same dose: no dose-response to fit")
    out = np.zeros((data.shape[1], 4))

    def loss(v: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
        return float(np.sum((sigmoid(v, x) - y) ** 2))

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(data.shape[1]):
            y = data[:, i]
            out[i] = scipy.optimize.fmin(loss, _start(x, y), args=(y,), maxiter=1000, maxfun=1000, disp=False)
    return out


@dataclass(frozen=True)
class PlateStatistics:
    features: list[str]
    z_prime: Matrix
    v_factor: Matrix
    #: (features x 4) bottom, top, EC50, hill; None without doses.
    ec50: Matrix | None
    negative: float
    positive: float
    wells_negative: int
    wells_positive: int
    wells_dosed: int


def plate_statistics(
    wells: Sequence[str],
    values: Matrix,
    features: Sequence[str],
    control: Mapping[str, str],
    dose: Mapping[str, str] | None,
    *,
    with_ec50: bool = True,
) -> PlateStatistics:
    """Z', V (and EC50 with doses) of every feature from per-well values
    (`values`: wells x features) and the map's control (and dose) of each well.
    Wells without a control value take no part in Z'; wells without a dose
    none in V and EC50."""
    codes = control_codes([control.get(w, "") for w in wells])
    known = ~np.isnan(codes)
    distinct = np.unique(codes[known])
    if len(distinct) < 2:
        raise QcError(
            "the plate map gives fewer than two control classes for the reduced wells: Z' needs "
            "negative and positive control wells"
        )
    z = z_factors(codes[known], values[known])
    if dose is not None:
        d = doses([dose.get(w, "") for w in wells])
    else:
        d = codes
    dosed = ~np.isnan(d)
    v = v_factors(d[dosed], values[dosed])
    fit = None
    if dose is not None and with_ec50 and len(np.unique(d[dosed])) > 1:
        fit = ec50(d[dosed], values[dosed])
    return PlateStatistics(
        list(features),
        z,
        v,
        fit,
        float(distinct[0]),
        float(distinct[-1]),
        int(np.sum(codes == distinct[0])),
        int(np.sum(codes == distinct[-1])),
        int(np.sum(dosed)),
    )


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None

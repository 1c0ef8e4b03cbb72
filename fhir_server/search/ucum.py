"""UCUM units reduced to a canonical form, so that quantity search compares like with like.

``canonical("mg/dL")`` gives the factor to the canonical unit and a canonical unit
code: 1 mg/dL = 10 g/m3, so ``(10.0, "g.m-3")``. Search compares quantities in
canonical units when both sides are UCUM and convertible (``5.4|http://unitsofmeasure.org|mg``
finds ``0.0054 g``). Covered: the UCUM grammar (products, quotients, exponents,
parentheses, annotations, ``10*n`` factors), the metric prefixes, SI and clinical
units. Units with an offset (``Cel``, ``[degF]``) or on a log scale (``[pH]``) are
not converted; they still match on their own code.
"""

from __future__ import annotations

import re
from functools import lru_cache

UCUM_SYSTEM = "http://unitsofmeasure.org"

PREFIXES = {
    "Y": 1e24, "Z": 1e21, "E": 1e18, "P": 1e15, "T": 1e12, "G": 1e9, "M": 1e6, "k": 1e3, "h": 1e2, "da": 1e1,
    "d": 1e-1, "c": 1e-2, "m": 1e-3, "u": 1e-6, "n": 1e-9, "p": 1e-12, "f": 1e-15, "a": 1e-18, "z": 1e-21, "y": 1e-24,
}

# Dimensions: m (length), s (time), g (mass), K (temperature), C (charge), cd (luminosity),
# mol (amount), eq (equivalents), iU (international units), rad (angle).
Dim = tuple[tuple[str, int], ...]

# atom: (factor to base units, dimension, may take a metric prefix)
_ATOMS: dict[str, tuple[float, dict[str, int], bool]] = {
    "1": (1.0, {}, False),
    "m": (1.0, {"m": 1}, True),
    "s": (1.0, {"s": 1}, True),
    "g": (1.0, {"g": 1}, True),
    "K": (1.0, {"K": 1}, True),
    "C": (1.0, {"C": 1}, True),
    "cd": (1.0, {"cd": 1}, True),
    "rad": (1.0, {"rad": 1}, True),
    "mol": (1.0, {"mol": 1}, True),
    "eq": (1.0, {"eq": 1}, True),
    "osm": (1.0, {"mol": 1}, True),
    "kat": (1.0, {"mol": 1, "s": -1}, True),
    "U": (1e-6 / 60, {"mol": 1, "s": -1}, True),
    "[iU]": (1.0, {"iU": 1}, True),
    "[IU]": (1.0, {"iU": 1}, True),
    "L": (1e-3, {"m": 3}, True),
    "l": (1e-3, {"m": 3}, True),
    "ar": (100.0, {"m": 2}, True),
    "Hz": (1.0, {"s": -1}, True),
    "N": (1000.0, {"g": 1, "m": 1, "s": -2}, True),
    "Pa": (1000.0, {"g": 1, "m": -1, "s": -2}, True),
    "bar": (1e8, {"g": 1, "m": -1, "s": -2}, True),
    "J": (1000.0, {"g": 1, "m": 2, "s": -2}, True),
    "cal": (4184.0, {"g": 1, "m": 2, "s": -2}, True),
    "W": (1000.0, {"g": 1, "m": 2, "s": -3}, True),
    "A": (1.0, {"C": 1, "s": -1}, True),
    "V": (1000.0, {"g": 1, "m": 2, "s": -2, "C": -1}, True),
    "Ohm": (1000.0, {"g": 1, "m": 2, "s": -1, "C": -2}, True),
    "sr": (1.0, {"rad": 2}, True),
    "deg": (3.141592653589793 / 180, {"rad": 1}, False),
    "min": (60.0, {"s": 1}, False),
    "h": (3600.0, {"s": 1}, False),
    "d": (86400.0, {"s": 1}, False),
    "wk": (604800.0, {"s": 1}, False),
    "mo": (2629800.0, {"s": 1}, False),
    "a": (31557600.0, {"s": 1}, False),
    "t": (1e6, {"g": 1}, True),
    "u": (1.6605402e-24, {"g": 1}, True),
    "[lb_av]": (453.59237, {"g": 1}, False),
    "[oz_av]": (28.349523125, {"g": 1}, False),
    "[gr]": (0.06479891, {"g": 1}, False),
    "[in_i]": (0.0254, {"m": 1}, False),
    "[ft_i]": (0.3048, {"m": 1}, False),
    "[yd_i]": (0.9144, {"m": 1}, False),
    "[mi_i]": (1609.344, {"m": 1}, False),
    "[foz_us]": (2.95735295625e-5, {"m": 3}, False),
    "[pt_us]": (4.73176473e-4, {"m": 3}, False),
    "[qt_us]": (9.46352946e-4, {"m": 3}, False),
    "[gal_us]": (3.785411784e-3, {"m": 3}, False),
    "m[Hg]": (133322.387415, {"g": 1, "m": -1, "s": -2}, True),
    "m[H2O]": (9806.65, {"g": 1, "m": -1, "s": -2}, True),
    "[in_i'Hg]": (3386.38815789, {"g": 1, "m": -1, "s": -2}, False),
    "atm": (101325000.0, {"g": 1, "m": -1, "s": -2}, False),
    "%": (0.01, {}, False),
    "[ppth]": (1e-3, {}, False),
    "[ppm]": (1e-6, {}, False),
    "[ppb]": (1e-9, {}, False),
    "[pptr]": (1e-12, {}, False),
    "10*": (10.0, {}, False),
    "10^": (10.0, {}, False),
    "[pi]": (3.141592653589793, {}, False),
    "[drp]": (5e-8, {"m": 3}, False),
    "[beth'U]": (1.0, {"iU": 1}, False),
    "[arb'U]": (1.0, {"arb": 1}, False),
    "[USP'U]": (1.0, {"usp": 1}, False),
    "[HPF]": (1.0, {}, False),
    "[LPF]": (1.0, {}, False),
    "[CFU]": (1.0, {"cfu": 1}, True),
    "[kcal_th]": (4184000.0, {"g": 1, "m": 2, "s": -2}, False),
    "[Cal]": (4184000.0, {"g": 1, "m": 2, "s": -2}, False),
    "mm[Hg]": (133.322387415, {"g": 1, "m": -1, "s": -2}, False),
    "cm[H2O]": (98.0665, {"g": 1, "m": -1, "s": -2}, False),
}
_NOT_CONVERTIBLE = {"Cel", "[degF]", "[degR]", "[pH]", "[degRe]"}
_TOKEN = re.compile(r"\{[^}]*\}|\[[^\]]*\]|[A-Za-z%'\[\]_]+(?:\[[^\]]*\])?|\d+|[./()*^+-]")


class NotConvertible(ValueError):
    pass


@lru_cache(maxsize=4096)
def canonical(unit: str) -> tuple[float, str]:
    """(factor, canonical code): value_in_canonical = value * factor. NotConvertible when unknown."""
    if not unit or len(unit) > 100:
        raise NotConvertible(unit)
    parser = _Parser(unit)
    try:
        factor, dims = parser.term()
    except (ZeroDivisionError, OverflowError, ValueError):
        raise NotConvertible(unit) from None
    if parser.pos != len(parser.tokens) or not (0 < abs(factor) < 1e300):
        raise NotConvertible(unit)
    code = ".".join(f"{d}{e}" for d, e in sorted(dims.items()) if e) or "1"
    return factor, code


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def term(self) -> tuple[float, dict[str, int]]:
        dims: dict[str, int]
        if self.peek() == "/":
            self.take()
            f, d = self.component()
            return 1.0 / f, {k: -v for k, v in d.items()}
        factor, dims = self.component()
        while self.peek() in (".", "/"):
            op = self.take()
            f, d = self.component()
            if op == ".":
                factor *= f
                for k, v in d.items():
                    dims[k] = dims.get(k, 0) + v
            else:
                factor /= f
                for k, v in d.items():
                    dims[k] = dims.get(k, 0) - v
        return factor, dims

    def component(self) -> tuple[float, dict[str, int]]:
        tok = self.peek()
        if tok is None:
            raise NotConvertible(self.text)
        if tok == "(":
            self.take()
            f, d = self.term()
            if self.peek() != ")":
                raise NotConvertible(self.text)
            self.take()
            return self._exponent(f, d)
        if tok.startswith("{"):
            self.take()
            return 1.0, {}
        if tok.isdigit():
            self.take()
            value = float(tok)
            if self.peek() in ("*", "^"):  # 10*3 / 10^3
                self.take()
                exp = self._signed_int()
                return value**exp, {}
            return value, {}
        self.take()
        # an annotation may follow a unit directly: mL{total}
        if self.peek() is not None and self.peek().startswith("{"):  # type: ignore[union-attr]
            self.take()
        f, d = _atom(tok, self.text)
        if self.peek() in ("*", "^") and tok in ("10",):
            self.take()
        return self._exponent(f, d)

    def _exponent(self, f: float, d: dict[str, int]) -> tuple[float, dict[str, int]]:
        tok = self.peek()
        if tok is not None and (tok.isdigit() or tok in ("+", "-")):
            exp = self._signed_int()
            return f**exp, {k: v * exp for k, v in d.items()}
        return f, dict(d)

    def _signed_int(self) -> int:
        sign = 1
        if self.peek() in ("+", "-"):
            sign = -1 if self.take() == "-" else 1
        tok = self.peek()
        if tok is None or not tok.isdigit() or len(tok) > 3:
            raise NotConvertible(self.text)
        self.take()
        return sign * int(tok)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise NotConvertible(text)
        tok = m.group(0)
        # split a trailing exponent off an atom: "m2", "cm3", "s-1" (digits are tokenized separately)
        tokens.append(tok)
        pos = m.end()
    return tokens


def _atom(tok: str, text: str) -> tuple[float, dict[str, int]]:
    if tok in _NOT_CONVERTIBLE:
        raise NotConvertible(text)
    if tok in _ATOMS:
        f, d, _ = _ATOMS[tok]
        return f, dict(d)
    for plen in (2, 1):
        prefix, rest = tok[:plen], tok[plen:]
        if prefix in PREFIXES and rest in _ATOMS and _ATOMS[rest][2]:
            if rest in _NOT_CONVERTIBLE:
                raise NotConvertible(text)
            f, d, _ = _ATOMS[rest]
            return PREFIXES[prefix] * f, dict(d)
    raise NotConvertible(text)

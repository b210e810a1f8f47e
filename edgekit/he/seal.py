"""CKKS on SEAL (through ``tenseal.sealapi``) with exact scale bookkeeping.

Why not TenSEAL's ``CKKSVector``: after every rescale it *declares* the ciphertext's scale to
be the global scale Δ = 2^b, while the true scale is Δ²/q for the dropped prime q. SEAL's
primes are only ≈ 2^b (q ≡ 1 mod 2N), so every rescale multiplies the decrypted value by
Δ/q: measured at ring 16384 with 30-bit primes, ``x·1.0`` repeated drifts by 9e-5, 3.4e-4,
8.5e-4, 1.5e-3, ... (the running product of Δ/q), the same in every slot. Products compound
it (x^(2^k) gets 2^k times the drift), which is the 0.14 error of the earlier encrypted
poly-softmax at 30-bit scale.

Here every ciphertext with ``m`` primes left carries exactly the canonical scale ``S[m]``:

    S[1] = Δ,   S[m] = sqrt(S[m−1] · q[m−1])   (q[m−1] is the prime a rescale at m drops)

so a product of two level-m operands (ciphertext or plaintext, both at scale S[m]) rescales
to exactly S[m]²/q[m−1] = S[m−1], and sums never meet two different scales. The recursion
runs from the bottom, where it is stable (from the top the relative deviation would double
each level). An operand with more primes left is brought down by a modulus switch plus a
multiplication by 1 encoded at the scale that lands on S[m]: no extra depth.

Products of a plaintext with several ciphertexts are summed before one rescale, and
ciphertext products before one relinearisation (``lincomb``, ``dot``). Plaintext vectors are
tiled over all slots, so slot-periodic layouts stay periodic under rotation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edgekit.errors import EdgekitError

Plain = float | np.ndarray


class Engine:
    """Keys, encoder and evaluator for one parameter set; ``rotations`` are Galois steps."""

    def __init__(self, ring_degree: int, coeff_mod_bit_sizes: Sequence[int], scale_bits: int,
                 rotations: Sequence[int] = ()):
        try:
            import tenseal.sealapi as seal
        except ImportError:
            raise EdgekitError("TenSEAL is not installed: pip install tenseal") from None
        self.seal = seal
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(ring_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(ring_degree, list(coeff_mod_bit_sizes)))
        self.ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.ctx.parameters_set():
            raise EdgekitError(f"SEAL refused the CKKS parameters: "
                               f"{self.ctx.parameters_error_message()}")
        keys = seal.KeyGenerator(self.ctx)
        public, self.relin = seal.PublicKey(), seal.RelinKeys()
        keys.create_public_key(public)
        keys.create_relin_keys(self.relin)
        self.galois = seal.GaloisKeys()
        if rotations:
            tool = self.ctx.key_context_data().galois_tool()
            elts = tool.get_elts_from_steps(sorted({int(r) for r in rotations}))
            keys.create_galois_keys(elts, self.galois)
        self.rotations = set(rotations)
        # the client encrypts its own inputs with its secret key: less fresh noise than
        # public-key encryption (measured, ring 32768, 30-bit scale: 2e-6 against 4e-5)
        self.encryptor = seal.Encryptor(self.ctx, public, keys.secret_key())
        self.decryptor = seal.Decryptor(self.ctx, keys.secret_key())
        self.evaluator = seal.Evaluator(self.ctx)
        self.encoder = seal.CKKSEncoder(self.ctx)
        self.slots = self.encoder.slot_count()
        self.parms_id: dict[int, list[int]] = {}  # primes left -> parms_id
        data = self.ctx.first_context_data()
        primes = [q.value() for q in data.parms().coeff_modulus()]
        while data is not None:
            self.parms_id[len(data.parms().coeff_modulus())] = data.parms_id()
            data = data.next_context_data()
        self.top = len(primes)
        self.scale = {1: 2.0 ** scale_bits}
        for m in range(2, self.top + 1):
            self.scale[m] = math.sqrt(self.scale[m - 1] * primes[m - 1])
        self.primes = primes

    # -- client side ---------------------------------------------------------------------
    def encrypt(self, values: Plain) -> Ct:
        pt = self._encode(values, self.top, self.scale[self.top])
        ct = self.seal.Ciphertext()
        self.encryptor.encrypt_symmetric(pt, ct)
        return Ct(self, ct)

    def decrypt(self, ct: Ct) -> np.ndarray:
        pt = self.seal.Plaintext()
        self.decryptor.decrypt(ct.c, pt)
        return np.asarray(self.encoder.decode_double(pt))

    # -- server side ---------------------------------------------------------------------
    def _encode(self, values: Plain, m: int, scale: float):
        pt = self.seal.Plaintext()
        if np.ndim(values) == 0:
            self.encoder.encode(float(values), self.parms_id[m], scale, pt)
        else:
            tiled = np.resize(np.asarray(values, dtype=np.float64), self.slots)
            self.encoder.encode(tiled.tolist(), self.parms_id[m], scale, pt)
        return pt

    def _new(self):
        return self.seal.Ciphertext()

    def lower(self, x: Ct, m: int) -> Ct:
        """``x`` with ``m`` primes left and the canonical scale S[m] (no depth when m < x.m)."""
        if x.m == m:
            return x
        if x.m < m:
            raise AssertionError("cannot raise a ciphertext's level")
        ev, c = self.evaluator, x.c
        if x.m > m + 1:
            c = self._new()
            ev.mod_switch_to(x.c, self.parms_id[m + 1], c)
        one = self._encode(1.0, m + 1, self.scale[m] * self.primes[m] / self.scale[x.m])
        out = self._new()
        ev.multiply_plain(c, one, out)
        ev.rescale_to_next_inplace(out)
        return self._exact(out, m)

    def _exact(self, c, m: int) -> Ct:
        c.scale = self.scale[m]  # equal up to float rounding: pin it for SEAL's scale checks
        return Ct(self, c)

    def align(self, *xs: Ct) -> list[Ct]:
        m = min(x.m for x in xs)
        return [self.lower(x, m) for x in xs]

    def _room(self, m: int) -> None:
        if m < 2:
            raise EdgekitError("the CKKS modulus chain is used up: the graph is deeper than the "
                               "levels chosen (he-check's depth should have prevented this)")

    def lincomb(self, xs: Sequence[Ct], weights: Sequence[Plain], bias: Plain = 0.0) -> Ct:
        """Σ wᵢ·xᵢ + bias with one rescale (plaintext weights: scalars or slot vectors)."""
        pairs = [(x, w) for x, w in zip(xs, weights, strict=True) if np.any(w)]
        if not pairs:  # SEAL refuses "transparent" (trivially zero) results
            out = self.zero(min(x.m for x in xs) - 1)
            return out.add_plain(bias) if np.any(bias) else out
        xs = self.align(*(x for x, _ in pairs))
        m = xs[0].m
        self._room(m)
        ev, acc = self.evaluator, None
        for x, (_, w) in zip(xs, pairs, strict=True):
            prod = self._new()
            ev.multiply_plain(x.c, self._encode(w, m, self.scale[m]), prod)
            if acc is None:
                acc = prod
            else:
                ev.add_inplace(acc, prod)
        ev.rescale_to_next_inplace(acc)
        out = self._exact(acc, m - 1)
        return out.add_plain(bias) if np.any(bias) else out

    def zero(self, m: int) -> Ct:
        """A fresh encryption of 0 with ``m`` primes left (public key: the server can)."""
        self._room(m + 1)
        out = self._new()
        self.encryptor.encrypt_zero(self.parms_id[m], out)
        return self._exact(out, m)

    def dot(self, xs: Sequence[Ct], ys: Sequence[Ct]) -> Ct:
        """Σ xᵢ·yᵢ of ciphertexts with one relinearisation and one rescale."""
        both = self.align(*xs, *ys)
        m = both[0].m
        self._room(m)
        ev, acc = self.evaluator, None
        for x, y in zip(both[: len(xs)], both[len(xs):], strict=True):
            prod = self._new()
            ev.multiply(x.c, y.c, prod)
            if acc is None:
                acc = prod
            else:
                ev.add_inplace(acc, prod)
        ev.relinearize_inplace(acc, self.relin)
        ev.rescale_to_next_inplace(acc)
        return self._exact(acc, m - 1)

    def rotate(self, x: Ct, step: int) -> Ct:
        """Slots moved left by ``step`` (slot i gets slot i + step)."""
        if step not in self.rotations:
            raise AssertionError(f"no Galois key for rotation {step}")
        out = self._new()
        self.evaluator.rotate_vector(x.c, step, self.galois, out)
        return Ct(self, out)


class Ct:
    """One ciphertext at the canonical scale of its level; numpy-friendly operators."""

    __slots__ = ("e", "c")

    def __init__(self, engine: Engine, c):
        self.e, self.c = engine, c

    @property
    def m(self) -> int:
        return self.c.coeff_modulus_size()

    def add_plain(self, p: Plain, sign: float = 1.0) -> Ct:
        out = self.e._new()
        pt = self.e._encode(np.multiply(sign, p), self.m, self.e.scale[self.m])
        self.e.evaluator.add_plain(self.c, pt, out)
        return Ct(self.e, out)

    def __add__(self, other):
        if isinstance(other, Ct):
            a, b = self.e.align(self, other)
            out = self.e._new()
            try:
                self.e.evaluator.add(a.c, b.c, out)
            except RuntimeError as exc:  # x + (−x): SEAL refuses the transparent result
                if "transparent" not in str(exc):
                    raise
                return self.e.zero(a.m)
            return Ct(self.e, out)
        return self.add_plain(other)

    __radd__ = __add__

    def __neg__(self) -> Ct:
        out = self.e._new()
        self.e.evaluator.negate(self.c, out)
        return Ct(self.e, out)

    def __sub__(self, other):
        if isinstance(other, Ct):
            return self + (-other)
        return self.add_plain(other, -1.0)

    def __rsub__(self, other):
        return (-self).add_plain(other)

    def __mul__(self, other):
        if isinstance(other, Ct):
            return self.e.dot([self], [other])
        return self.e.lincomb([self], [other])

    __rmul__ = __mul__

"""Expand csrc/kernels.spec into the C binding of the damex kernels.

Each ``kernel`` block of the spec (its format is described at the top of
csrc/kernels.spec) becomes one entry point of damex._C: a METH_VARARGS
function that parses its arguments, checks every buffer (dtype, C-contiguity,
alignment, element count, writeability) and size (range), releases the GIL,
calls the kernel and maps its status to an exception; plus a docstring with a
text signature, so ``inspect.signature(damex._C.NAME)`` works.  The checks
themselves are the helpers of csrc/binding.h; this file only writes the calls.

setup.py runs ``generate(spec, out)`` before building; ``python csrc/bindgen.py
SPEC OUT`` does the same by hand.  The output is a build product (not committed).
"""
import os
import re
import sys

BUFFER_TYPES = {  # spec type: (C element type, NumPy type number, docstring dtype)
    "f32": ("float", "NPY_FLOAT32", "float32"),
    "i64": ("int64_t", "NPY_INT64", "int64"),
    "u8": ("uint8_t", "NPY_UINT8", "uint8"),
}
SCALAR_TYPES = {  # spec type: (C type, PyArg_ParseTuple code)
    "int": ("int", "i"),
    "float": ("float", "f"),
    "double": ("double", "d"),
    "i64": ("long long", "L"),
    "u64": ("unsigned long long", "K"),
}
ROLES = {"in": "DAMEX_IN", "out": "DAMEX_OUT", "inout": "DAMEX_OUT"}
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
INT_MAX = "INT_MAX"


class SpecError(ValueError):
    pass


class Arg:
    def __init__(self, kind, name, **kw):
        self.kind, self.name = kind, name
        self.__dict__.update(kw)

    @property
    def python(self):
        return self.kind not in ("count", "ret")


class Kernel:
    def __init__(self, name, summary, line):
        self.name, self.summary, self.line = name, summary, line
        self.args, self.requires, self.returns = [], [], None
        self.lets, self.call = [], None  # [(name, expr, message)], C argument list or None

    def arg(self, name):
        return next((a for a in self.args if a.name == name), None)


def parse(text, path="kernels.spec"):
    """Return (includes, kernels) of a spec text."""
    includes, kernels, k = [], [], None
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{no}"
        words = line.split()
        if not raw[0].isspace():
            if words[0] == "include" and len(words) == 2:
                includes.append(words[1])
            elif words[0] == "kernel" and ":" in line:
                head, summary = line[len("kernel"):].split(":", 1)
                name = head.strip()
                if not re.fullmatch(NAME, name) or not summary.strip():
                    raise SpecError(f"{where}: expected 'kernel NAME: summary'")
                k = Kernel(name, summary.strip(), where)
                kernels.append(k)
            else:
                raise SpecError(f"{where}: expected 'include H' or 'kernel NAME: summary'")
            continue
        if k is None:
            raise SpecError(f"{where}: argument line outside a kernel block")
        _parse_arg(k, line.strip(), where)
    names = [k.name for k in kernels]
    for k in kernels:
        if names.count(k.name) > 1:
            raise SpecError(f"{k.line}: kernel {k.name} described twice")
        _check(k)
    return includes, kernels


def _parse_arg(k, line, where):
    m = re.fullmatch(rf"(in|out|inout)(\??)\s+(\w+)\s+({NAME})\[([^\]]+)\]", line)
    if m:
        role, opt, typ, name, extent = m.groups()
        if typ not in BUFFER_TYPES:
            raise SpecError(f"{where}: buffer type {typ!r} is not one of {sorted(BUFFER_TYPES)}")
        factors = [f.strip() for f in extent.split("*")]
        if not all(re.fullmatch(NAME, f) or f.isdigit() for f in factors):
            raise SpecError(f"{where}: element count {extent!r} is not a product")
        k.args.append(Arg("buffer", name, role=role, optional=bool(opt), type=typ,
                          factors=factors, extent=extent.replace(" ", ""), where=where))
        return
    words = line.split()
    if words[0] == "require":
        cond, sep, msg = line[len("require"):].partition(":")
        if not sep or not cond.strip() or not msg.strip():
            raise SpecError(f"{where}: expected 'require EXPR: message'")
        k.requires.append((cond.strip(), msg.strip()))
    elif words[0] == "let":
        m = re.fullmatch(rf"let\s+({NAME})\s*=\s*(.+?):\s*(.+)", line)
        if not m:
            raise SpecError(f"{where}: expected 'let NAME = EXPR: message'")
        k.lets.append(m.groups())
    elif words[0] == "call":
        if k.call is not None or len(words) < 2:
            raise SpecError(f"{where}: expected one 'call ARGS' line")
        k.call = line[len("call"):].strip()
    elif words[0] == "returns" and words[1:] == ["nonfinite"]:
        k.returns = "nonfinite"
    elif words[0] == "count" and len(words) == 2:
        k.args.append(Arg("count", words[1], where=where))
    elif words[0] == "ret" and words[1:2] == ["f64"] and len(words) == 3:
        k.args.append(Arg("ret", words[2], where=where))
    elif words[0] == "dim" and len(words) in (2, 3):
        lo, hi = "0", INT_MAX
        if len(words) == 3:
            m = re.fullmatch(rf"(-?\d+|{NAME})\.\.(-?\d+|{NAME})?", words[2])
            if not m:
                raise SpecError(f"{where}: expected a range LO..[HI], got {words[2]!r}")
            lo, hi = m.group(1), m.group(2) or INT_MAX
        k.args.append(Arg("dim", words[1], lo=lo, hi=hi, where=where))
    elif words[0] in SCALAR_TYPES and len(words) == 2:
        k.args.append(Arg("scalar", words[1], type=words[0], where=where))
    else:
        raise SpecError(f"{where}: cannot read {line!r}")
    if words[0] in ("count", "ret", "dim") or words[0] in SCALAR_TYPES:
        if not re.fullmatch(NAME, k.args[-1].name):
            raise SpecError(f"{where}: {k.args[-1].name!r} is not a C name")


def _check(k):
    seen = set()
    for a in k.args:
        if a.name in seen:
            raise SpecError(f"{a.where}: {a.name} named twice in {k.name}")
        seen.add(a.name)
    sizes = {a.name for a in k.args if a.kind in ("dim", "count")} | {n for n, _, _ in k.lets}
    for n, _, _ in k.lets:
        if n in seen:
            raise SpecError(f"{k.line}: {n} named twice in {k.name}")
    for a in k.args:
        if a.kind == "buffer":
            for f in a.factors:
                if not f.isdigit() and f not in sizes:
                    raise SpecError(f"{a.where}: {f} in {a.name}[{a.extent}] is not a size of {k.name}")
            if sum(f in counts_of(k) for f in a.factors) > 1:
                raise SpecError(f"{a.where}: {a.name}[{a.extent}] has two counts")
        if a.kind == "dim":
            earlier = {b.name for b in k.args[:k.args.index(a)] if b.kind == "dim"}
            for bound in (a.lo, a.hi):
                if not re.fullmatch(r"-?\d+|INT_MAX", bound) and bound not in earlier:
                    raise SpecError(f"{a.where}: bound {bound} of {a.name} is not an earlier dim")
    for c in counts_of(k):
        if count_source(k, c) is None:
            raise SpecError(f"{k.line}: no required input buffer gives the count {c}")
    if sum(a.kind == "ret" for a in k.args) > 1 or (k.returns and any(a.kind == "ret" for a in k.args)):
        raise SpecError(f"{k.line}: {k.name} returns more than one thing")


def counts_of(k):
    return [a.name for a in k.args if a.kind == "count"]


def count_source(k, c):
    """The buffer the count `c` is read off: a required input holding it, alone if one does."""
    cands = [a for a in k.args if a.kind == "buffer" and a.role != "out" and not a.optional
             and c in a.factors]
    alone = [a for a in cands if a.factors == [c]]
    return (alone or cands or [None])[0]


# ---- C output ------------------------------------------------------------------

def _product(factors):
    """C expression of an element count: nested overflow-checked products."""
    expr = f"(npy_intp){factors[0]}"
    for f in factors[1:]:
        expr = f"damex_mul({expr}, {f})"
    return expr


def _cstr(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def docstring(k):
    params = ", ".join(a.name for a in k.args if a.python)
    lines = [f"{k.name}($module, {params}, /)", "--", "", k.summary, ""]
    for a in k.args:
        if a.kind == "buffer":
            what = {"in": "read", "out": "written", "inout": "read and written"}[a.role]
            none = " or None" if a.optional else ""
            lines.append(f"{a.name}: {BUFFER_TYPES[a.type][2]}[{a.extent}]{none}, {what}")
        elif a.kind == "dim":
            lines.append(f"{a.name}: size in [{a.lo}, {a.hi}]")
        elif a.kind == "scalar":
            lines.append(f"{a.name}: {a.type}")
        elif a.kind == "count":
            lines.append(f"({a.name}: read off {count_source(k, a.name).name})")
    lines += [f"({name} = {expr})" for name, expr, _ in k.lets]
    if k.returns == "nonfinite":
        lines.append("Returns 0, or 1 where the kernel met NaN/inf.")
    elif any(a.kind == "ret" for a in k.args):
        lines.append("Returns a float.")
    return "\n".join(lines)


def function(k):
    """The C entry point of one kernel."""
    K = _cstr(k.name)
    out = [f"/* {k.name}({', '.join(a.name for a in k.args if a.python)}) */",
           f"static PyObject *py_{k.name}(PyObject *self, PyObject *args)", "{"]
    fmt, ptrs = "", []
    for a in k.args:
        if a.kind == "buffer":
            out.append(f"    PyObject *o_{a.name};")
            fmt += "O"
            ptrs.append(f"&o_{a.name}")
        elif a.kind == "dim":
            out.append(f"    Py_ssize_t {a.name}_;")
            fmt += "n"
            ptrs.append(f"&{a.name}_")
        elif a.kind == "scalar":
            ctype, code = SCALAR_TYPES[a.type]
            out.append(f"    {ctype} {a.name};")
            fmt += code
            ptrs.append(f"&{a.name}")
    out.append(f'    if (!PyArg_ParseTuple(args, "{fmt}:{k.name}", {", ".join(ptrs)})) return NULL;')
    for a in k.args:
        if a.kind == "dim":
            out.append(f"    int {a.name};")
            out.append(f'    if (damex_dim(&{a.name}, {a.name}_, {a.lo}, {a.hi}, {K}, "{a.name}") < 0) '
                       "return NULL;")
    for name, expr, msg in k.lets:
        out.append(f"    long {name} = {expr};")
        out.append(f"    if ({name} < 0) return damex_invalid({K}, {_cstr(msg)});")
    bufs = [a for a in k.args if a.kind == "buffer"]
    sources = {c: count_source(k, c) for c in counts_of(k)}
    first = [b for b in bufs if b in sources.values()]
    for b in first + [b for b in bufs if b not in first]:
        ctype, typenum, _ = BUFFER_TYPES[b.type]
        const = "const " if b.role == "in" else ""
        flags = ROLES[b.role] + (" | DAMEX_OPTIONAL" if b.optional else "")
        counts = [c for c, src in sources.items() if src is b]
        n = "-1" if counts else _product(b.factors)
        out.append(f"    DAMEX_BUFFER({const}{ctype}, {b.name}, o_{b.name}, {K}, {typenum}, {n}, {flags});")
        for c in counts:
            rest = [f for f in b.factors if f != c] or ["1"]
            out.append(f"    npy_intp {c};")
            out.append(f'    if (damex_count(&{c}, o_{b.name}, {_product(rest)}, {K}, "{b.name}") < 0) '
                       "return NULL;")
    for cond, msg in k.requires:
        out.append(f"    if (!({cond})) return damex_invalid({K}, {_cstr(msg)});")
    call_args = []
    for a in k.args:
        call_args.append(f"&{a.name}" if a.kind == "ret" else a.name)
    call = f"{k.name}({k.call or ', '.join(call_args)})"
    ret = next((a for a in k.args if a.kind == "ret"), None)
    if ret is not None:
        out.append(f"    double {ret.name} = 0.0;")
        out.append(f"    DAMEX_RUN_FLOAT({K}, {call}, {ret.name});")
    elif k.returns == "nonfinite":
        out.append(f"    DAMEX_RUN_NONFINITE({K}, {call});")
    else:
        out.append(f"    DAMEX_RUN({K}, {call});")
    out.append("}")
    return "\n".join(out)


def render(includes, kernels, spec_name="csrc/kernels.spec"):
    parts = [f"/* Generated from {spec_name} by csrc/bindgen.py: do not edit (edit the spec). */",
             '#include "binding.h"']
    parts += [f'#include "{h}"' for h in includes]
    parts.append("")
    for k in kernels:
        parts += [function(k), ""]
    parts.append("PyMethodDef damex_kernel_methods[] = {")
    for k in kernels:
        parts.append(f"    {{\"{k.name}\", py_{k.name}, METH_VARARGS,")
        parts.append(f"     {_cstr(docstring(k)).replace(chr(10), chr(92) + 'n')}}},")
    parts.append("    {NULL, NULL, 0, NULL}};")
    return "\n".join(parts) + "\n"


def generate(spec_path, out_path):
    """Write the binding of `spec_path` to `out_path` (only if it changed); return out_path."""
    with open(spec_path) as f:
        includes, kernels = parse(f.read(), spec_path)
    text = render(includes, kernels, spec_path)
    try:
        with open(out_path) as f:
            if f.read() == text:
                return out_path
    except OSError:
        pass
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python csrc/bindgen.py SPEC OUT.c")
    generate(sys.argv[1], sys.argv[2])

"""The QFL kernel's loops and their common paths in `cuobjdump -sass` listings (the counting of
benchmarks/qfl_kernel_bounds.py; the rules are in its docstring).

A kernel is a list of (address, instruction text).  A loop is a backward BRA (head, back edge);
its common path runs from the head to the back edge, following unconditional forward branches
and deciding a predicated one by what set its predicate (:func:`_taken`).
"""

from __future__ import annotations

import re


def parse(listing: str) -> dict[str, list[tuple[int, str]]]:
    """mangled kernel name -> its instructions, from `cuobjdump -sass`."""
    funcs = {}
    for part in re.split(r"\n\s*Function : ", listing)[1:]:
        name = part.split("\n", 1)[0].strip()
        ins = []
        for line in part.split("\n"):
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*(/\*.*)?$", line)
            if m:
                ins.append((int(m.group(1), 16), m.group(2).rstrip(" ;")))
        funcs[name] = ins
    return funcs


def branch_target(text: str) -> int | None:
    m = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def loops(ins):
    """(every loop, the innermost ones), each as (head, back edge) addresses."""
    found = [(t, a) for a, text in ins if (t := branch_target(text)) is not None and t <= a]
    inner = [
        lp for lp in found if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in found)
    ]
    return found, inner


def _pred_writer(ins, i, preg):
    for j in range(i - 1, -1, -1):
        body = re.sub(r"^@!?U?P\w+\s+", "", ins[j][1])
        ops = body.split(None, 1)
        if len(ops) < 2:
            continue
        dsts = [d.strip() for d in ops[1].split(",")[:2]]
        if (
            re.match(r"(U?I|F|D|H)SETP|FCHK", ops[0])
            and preg in dsts[: 2 if "SETP" in ops[0] else 1]
        ):
            return body
    return None


def _label_test(word: int) -> re.Pattern:
    """The after kernel's per-word "label not in this word" test, ``label - e > word - 1``
    unsigned, with the predicate it sets as group 1."""
    return re.compile(rf"ISETP\.GT\.U32\.AND (P\d), PT, R\d+, {word - 1:#x}\b")


def _taken(ins, i, text, env) -> bool:
    m = re.match(r"@(!?)(P\d)\s+BRA", text)
    negated, preg = m.group(1) == "!", m.group(2)
    w = _pred_writer(ins, i, preg)
    value = False  # FCHK and data tests: the common case is "no special case"
    if w and re.match(r"ISETP\.GT\.U32\.AND P\d, PT, R\d+, 0x1ffffff", w):
        value = True  # the reciprocal's normal-range fast path
    elif w and (env.get("word") or 0) > 1 and _label_test(env["word"]).match(w):
        value = True  # label - e outside [0, word): the label is not in this word (common case)
    elif w and (mm := re.match(r"ISETP\.(NE|EQ)\.AND P\d, PT, (\w+), (\w+)", w)):
        a, b = mm.group(2), mm.group(3)
        reg, other = (a, b) if a in env["mode"] or a in env["act"] else (b, a)
        runtime = {*env["mode"], *env["act"]}
        if env.get("labels") and a not in runtime and b not in runtime and "RZ" not in (a, b):
            # the scalar loop's "is this column the label" (j == label): not, in the common case
            value = mm.group(1) == "NE"
        elif reg in env["mode"]:
            k = 0 if other == "RZ" else int(other, 16) if other.startswith("0x") else None
            value = (env["mode_value"] != k) == (mm.group(1) == "NE")
        elif reg in env["act"]:
            value = (env["act_value"] != 0) == (mm.group(1) == "NE")
    return value != negated


def _walk(ins, lo, hi, env):
    """(address, text) of each instruction on the common path from lo to hi (forward only: each
    address once).  A conditional branch out of the loop (past hi) is never the common path:
    whichever way its predicate is written, the loop goes round."""
    at = {a: k for k, (a, _) in enumerate(ins)}
    i = at[lo]
    while True:
        a, text = ins[i]
        yield a, text
        if a == hi:
            return
        t = branch_target(text)
        conditional = text.startswith("@")
        if t is not None and t > a and (not conditional or (t <= hi and _taken(ins, i, text, env))):
            i = at[t]
            continue
        i += 1


def common_path(ins, lo, hi, env) -> list[str]:
    return [text for _, text in _walk(ins, lo, hi, env)]


def runtime_env(
    ins,
    mode_off: int,
    act_off: int,
    mode: int,
    activated: bool,
    word: int | None = None,
    labels: bool = False,
):
    """The registers that hold the runtime mode / activated parameters (before kernel), the
    elements per 16-byte word (after kernel: its per-word "is the label here" test), and whether
    the after kernel takes (labels, scores) (its scalar loop's "is this column the label" test:
    a comparison of two registers, not equal in the common case)."""
    mode_regs, act_regs = set(), set()
    for _, text in ins:
        m = re.match(r"U?LDC(?:\.U8|\.S8)? (U?R\d+), c\[0x0\]\[(0x[0-9a-f]+)\]", text)
        if m and int(m.group(2), 16) == mode_off:
            mode_regs.add(m.group(1))
        if m and int(m.group(2), 16) == act_off:
            act_regs.add(m.group(1))
        m = re.match(r"UPRMT (UR\d+), (UR\d+), 0x8880", text)
        if m and m.group(2) in act_regs:
            act_regs.add(m.group(1))
    return {
        "mode": mode_regs,
        "act": act_regs,
        "mode_value": mode,
        "act_value": activated,
        "word": word,
        "labels": labels,
    }


def element_loops(ins, env, need_mufu: bool):
    """The innermost loops that do element math, longest common path first (after: the 16-byte
    word loop, then the scalar loop of the row's head and tail)."""
    _, inner = loops(ins)
    found = []
    for lo, hi in inner:
        path = common_path(ins, lo, hi, env)
        if need_mufu and not any("MUFU" in t for t in path):
            continue
        if not need_mufu and len(path) < 24:
            continue  # the shuffle reduction's loop
        found.append((lo, hi, path))
    return sorted(found, key=lambda f: -len(f[2]))


def row_work(ins, env) -> int:
    """The row loop's common path minus the element loops it passes through."""
    found, inner = loops(ins)
    lo, hi = min((lp for lp in found if lp not in inner), key=lambda lp: lp[0] - lp[1])
    path_addrs = {a for a, _ in _walk(ins, lo, hi, env)}
    inside = 0
    for l_lo, l_hi in inner:
        if l_lo in path_addrs and lo <= l_lo and l_hi <= hi:
            inside += len(common_path(ins, l_lo, l_hi, env))
    return len(path_addrs) - inside


def label_patch(ins, word: int) -> int:
    """Instructions the after kernel's "is the label in this word" test skips (the one general
    element a positive's label word adds, run by that lane alone): the longest such region,
    0 when the kernel has none (dense forms, double)."""
    at = {a: k for k, (a, _) in enumerate(ins)}
    test = _label_test(word)
    longest = 0
    for i, (a, text) in enumerate(ins):
        m = re.match(r"@(P\d)\s+BRA", text)
        t = branch_target(text)
        if not m or t is None or t <= a:
            continue
        w = _pred_writer(ins, i, m.group(1))
        if w and (mm := test.match(w)) and mm.group(1) == m.group(1):
            longest = max(longest, at[t] - i - 1)
    return longest

#!/usr/bin/env python3
"""ARCHITECTURE.md's invariant: no two modules of a crate import each other,
directly or around a circle. Per crate, the graph of top-level modules
(`crate::x`, re-exports of the crate root and `super::` paths count) and
its cycles; exits 1 naming each one. Usage: module-cycles.py crates/*"""
import os, re, sys
from itertools import chain

def top_modules(src):
    mods = {}
    for root, dirs, files in os.walk(src):
        for f in files:
            if not f.endswith('.rs'): continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, src)
            parts = rel.split(os.sep)
            if parts[0] == 'bin': continue
            if len(parts) == 1:
                name = parts[0][:-3]
                if name in ('lib', 'main'): name = '<root>'
            else:
                name = parts[0]
            mods.setdefault(name, []).append((p, parts))
    return mods

def strip(text):
    text = re.sub(r'//[^\n]*', '', text)
    text = re.sub(r'/\*.*?\*/', '', text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text

REEXP = {}

def reexports(src):
    m = {}
    for root in ('lib.rs', 'main.rs'):
        p = os.path.join(src, root)
        if not os.path.exists(p): continue
        t = strip(open(p).read())
        for mm in re.finditer(r'pub use (\w+)::\{([^}]*)\}', t):
            for it in mm.group(2).split(','):
                it = it.strip()
                if it: m[it.split(' as ')[-1].strip()] = mm.group(1)
        for mm in re.finditer(r'pub use (\w+)::(\w+)\s*;', t):
            m[mm.group(2)] = mm.group(1)
    return m

def refs(path, parts, names, selfname):
    text = strip(open(path).read())
    out = set()
    for m in re.finditer(r'\bcrate::(\w+)', text):
        out.add(m.group(1))
    # use crate::{a, b::c}
    for m in re.finditer(r'\bcrate::\{([^}]*)\}', text):
        for item in re.split(r',', m.group(1)):
            w = item.strip().split('::')[0].strip()
            if w: out.add(w)
    # super:: from a submodule: depth = len(parts)-1 dirs; file x/y.rs is module x::y; super = x
    depth = len(parts) - 1  # 0 for top-level file
    if parts[-1] == 'mod.rs': depth -= 1
    # top-level file foo.rs with inline mod tests { use super::* } -> refers to itself; ignore
    # submodule at depth d: super::super...(d times) reaches crate root, then next ident is a top module
    if depth >= 1:
        pat = r'\b' + r'super::' * depth + r'(\w+)'
        for m in re.finditer(pat, text):
            out.add(m.group(1))
        # also deeper inline mods: super::super::... more levels; approximate
        pat = r'\b' + r'super::' * (depth + 1) + r'(\w+)'
        for m in re.finditer(pat, text):
            out.add(m.group(1))
    else:
        # inline mod tests inside top-level file: super::super::x
        for m in re.finditer(r'\bsuper::super::(\w+)', text):
            out.add(m.group(1))
    out = {REEXP.get(r, r) for r in out}
    return {r for r in out if r in names and r != selfname}

def cycles(graph):
    # Tarjan SCC
    index, low, stack, on, res = {}, {}, [], set(), []
    i = [0]
    def sc(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: res.append(sorted(comp))
    for v in graph:
        if v not in index: sc(v)
    return res

failed = False
for crate in sys.argv[1:]:
    src = os.path.join(crate, 'src')
    if not os.path.isdir(src):
        continue
    mods = top_modules(src)
    REEXP.clear(); REEXP.update(reexports(src))
    names = set(mods) - {'<root>'}
    graph = {}
    for name, files in mods.items():
        if name == '<root>': continue
        deps = set()
        for p, parts in files:
            deps |= refs(p, parts, names, name)
        graph[name] = sorted(deps)
    for c in cycles(graph):
        failed = True
        print(f'{crate}: modules import each other around a circle: {", ".join(c)}')
        for a in c:
            for b in graph[a]:
                if b in c: print(f'    {a} -> {b}')
if failed:
    sys.exit(1)
print(f'module graph: no cycles in {len(sys.argv) - 1} crates')

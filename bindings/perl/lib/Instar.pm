package Instar;

use strict;
use warnings;

use JSON::PP ();

our $VERSION = '0.1.0';

require XSLoader;
XSLoader::load('Instar', $VERSION);

# The booleans the XS code puts in results: the same objects JSON::PP decodes qemu-img's true/false into, so a
# result compares equal (is_deeply) with decode_json of qemu-img's JSON.
our $_TRUE  = JSON::PP::true();
our $_FALSE = JSON::PP::false();

use constant {
    E_INVALID => -1, E_IO => -2, E_NOT_FOUND => -3, E_CORRUPT => -4, E_UNSUPPORTED => -5, E_LOCKED => -6,
    E_NOMEM => -7, E_CANCELLED => -8, E_PERMISSION => -9, E_ENCRYPTED => -10, E_CHAIN => -11, E_RANGE => -12,
    E_LIMIT => -13, E_POLICY => -14, E_ISOLATION => -15,

    OPEN_READ_WRITE => 1, OPEN_FORCE_SHARE => 2, OPEN_NO_BACKING => 4, OPEN_NO_CACHE => 8, OPEN_ISOLATED => 16,
    CHECK_REPAIR_LEAKS => 1, CHECK_REPAIR_ERRORS => 2, CHECK_REPAIR_ALL => 3,
    ZERO_MAY_UNMAP => 1,
    STATUS_ALLOCATED => 1, STATUS_DATA => 2, STATUS_ZERO => 4, STATUS_EOF => 8,
    BITMAP_ADD => 1, BITMAP_REMOVE => 2, BITMAP_CLEAR => 3, BITMAP_ENABLE => 4, BITMAP_DISABLE => 5,
    BITMAP_MERGE => 6,
};

# format-specific is decoded with JSON::XS when it is installed (Proxmox has it; about ten times faster), else
# with the core JSON::PP; both give JSON::PP::Boolean objects. INSTAR_JSON_PP=1 forces JSON::PP.
my $json = (!$ENV{INSTAR_JSON_PP} && eval { require JSON::XS; JSON::XS->new->utf8(0) }) || JSON::PP->new->utf8(0);

sub _finish_info {
    my ($h) = @_;
    if (defined(my $fs = delete $h->{_format_specific_json})) {
        $h->{'format-specific'} = $json->decode($fs);
    }
    return $h;
}

# Options: a list of key => value pairs, or one hash reference.
sub _opts {
    return $_[0] if @_ == 1 && ref($_[0]) eq 'HASH';
    die Instar::Error->can('throw')->('Instar::Error', code => E_INVALID, errno => 0,
        message => 'options must be key => value pairs or a hash reference') if @_ % 2;
    return {@_};
}

sub info {
    my ($filename, @opts) = @_;
    my $r = _info($filename, _opts(@opts));
    return ref($r) eq 'ARRAY' ? [map { _finish_info($_) } @$r] : _finish_info($r);
}

my %bitmap_action = (add => 1, remove => 2, clear => 3, enable => 4, disable => 5, merge => 6);

sub bitmap {
    my ($filename, $name, $actions, @o) = @_;
    my %opts = %{ _opts(@o) };
    my @acts;
    for my $a (@$actions) {
        my ($what, $src) = ref($a) eq 'ARRAY' ? @$a : ($a);
        my $code = $what =~ /^\d+$/ ? $what : $bitmap_action{$what};
        die "Instar::bitmap: unknown action '$what'\n" if !$code;
        push @acts, [$code, $src];
    }
    return _bitmap($filename, $name, \@acts, \%opts);
}

sub snapshot_create { my ($f, $n, @o) = @_; return _snapshot(0, $f, $n, _opts(@o)); }
sub snapshot_apply  { my ($f, $n, @o) = @_; return _snapshot(1, $f, $n, _opts(@o)); }
sub snapshot_delete { my ($f, $n, @o) = @_; return _snapshot(2, $f, $n, _opts(@o)); }

# The hash-taking XS functions also accept a flat list of options.
for my $name (qw(info_json info_human map compare convert create create_formatting measure check check_report check_json
                 check_chain_json resize amend probe inspect commit rebase dd bench snapshot_list)) {
    no strict 'refs';
    no warnings 'redefine';
    my $xs = \&{"Instar::$name"};
    my $nargs = { compare => 2, convert => 2, dd => 2, resize => 2 }->{$name} // 1;
    *{"Instar::$name"} = sub {
        my @pos = splice(@_, 0, $nargs);
        return $xs->(@pos, _opts(@_));
    };
}

package Instar::Error;

use overload '""' => sub { $_[0]->{message} }, 'bool' => sub { 1 }, fallback => 1;

sub code    { $_[0]->{code} }
sub errno   { $_[0]->{errno} }
sub message { $_[0]->{message} }
sub throw   { my ($class, %a) = @_; die bless {%a}, $class; }

package Instar::Image;

use Scalar::Util ();

sub open {
    my ($class, $filename, %opts) = @_;
    my $h = _open($filename, \%opts);
    return bless { h => $h, filename => $filename, opts => {%opts} }, $class;
}

sub _h {
    my ($self) = @_;
    die Instar::Error->can('throw')->('Instar::Error', code => -1, errno => 0, message => 'image is closed')
        if !$self->{h};
    return $self->{h};
}

sub filename { $_[0]->{filename} }
sub size     { _size($_[0]->_h) }
sub read     { my ($s, $count, $offset) = @_; _read($s->_h, $count, $offset // 0) }
sub write    { my ($s, $data, $offset) = @_; _write($s->_h, $data, $offset // 0); return length($data) }
sub write_zeroes { my ($s, $count, $offset, $flags) = @_; _write_zeroes($s->_h, $count, $offset // 0, $flags // 0) }
sub discard  { my ($s, $count, $offset) = @_; _discard($s->_h, $count, $offset // 0) }
sub flush    { _flush($_[0]->_h) }
sub block_status { my ($s, $offset, $count) = @_; _block_status($s->_h, $offset // 0, $count) }

sub _path_opts {
    my ($self, %extra) = @_;
    my %o = (%extra);
    $o{format} //= $self->{opts}{format} if defined $self->{opts}{format};
    $o{key_secret} //= $self->{opts}{key_secret} if defined $self->{opts}{key_secret};
    $o{force_share} = 1;    # our own handle holds the lock
    return %o;
}

sub info { my ($s, %o) = @_; $s->_h; Instar::info($s->{filename}, $s->_path_opts(%o)) }
sub map  { my ($s, %o) = @_; $s->_h; Instar::map($s->{filename}, $s->_path_opts(%o)) }

sub close {
    my ($self) = @_;
    _close(delete $self->{h}) if $self->{h};
    return;
}

sub DESTROY { $_[0]->close }

# A new perl thread gets no copy of a handle (two copies would close the library handle twice).
sub CLONE_SKIP { 1 }

1;

__END__

=head1 NAME

Instar - Perl bindings for libinstar, a disk-image engine compatible with qemu-img 7.2

=head1 SYNOPSIS

    use Instar;

    my $info = Instar::info('disk.qcow2');              # the hash qemu-img info --output=json gives
    print $info->{'virtual-size'}, "\n";
    my $text = Instar::info_json('disk.qcow2', backing_chain => 1);   # qemu-img's bytes

    Instar::create('new.qcow2', format => 'qcow2', size => 10 * 2**30, options => 'cluster_size=128k');
    Instar::convert('in.vmdk', 'out.qcow2', target_format => 'qcow2',
        progress => sub { my ($pct) = @_; print "$pct%\n"; return 0 });

    my $img = Instar::Image->open('disk.qcow2', flags => Instar::OPEN_READ_WRITE);
    $img->write("hello", 0);
    my $bytes = $img->read(512, 0);
    $img->close;

    eval { Instar::info('/nonexistent') };
    if (ref $@ && $@->isa('Instar::Error')) {
        printf "code %d errno %d: %s\n", $@->code, $@->errno, $@->message;
    }

=head1 DESCRIPTION

An XS module over the C API of libinstar (C<instar.h>); it does not run any program. Each function takes the
path(s) it works on followed by options as a list of C<< key => value >> pairs (or one hash reference). The
option keys are the field names of the C option structs (C<format>, C<key_secret>, C<options>, ...); flag bits
also have named booleans (C<force_share>, C<no_create>, C<compress>, C<unsafe>, C<shrink>, ...) or can be given
as a number in C<flags>/C<open_flags>.

Byte counts and offsets are Perl integers (IV/UV): nothing goes through a floating-point number, so sizes above
2**53 stay exact on a 64-bit perl.

=head2 Limits

Every function takes C<timeout> and C<cpu_limit> (seconds, fractions allowed): the library stops the call when
it runs longer, or when a thread working for it used more CPU time, and dies with code C<Instar::E_LIMIT>. It
stops before a read or between the steps of an operation, so an image being written is left as a crash at that
point would leave it (C<qemu-img check> finds leaks at most).

C<memory_limit> (bytes) bounds the metadata the call holds for its images (tables, caches, bitmaps, snapshot
tables, key material, decompression buffers): an image whose headers ask for more makes the call die with
C<Instar::E_LIMIT> and a message naming what it was allocating, before allocating it.

=head2 Strings

File names and option strings are passed as the bytes perl holds (a character string gives its UTF-8
encoding). Text the library returns (C<info_json>, C<info_human>, C<check_json>, error messages) is bytes, as
qemu-img writes it; strings inside result hashes are characters when they are valid UTF-8, as C<decode_json>
of qemu-img's output gives them.

=head2 Errors

Every failure dies with an C<Instar::Error> object: C<< ->code >> (one of the C<Instar::E_*> constants),
C<< ->errno >> (the errno behind it, or 0) and C<< ->message >> (what qemu-img prints after C<qemu-img: >). It
stringifies to the message.

=head2 Progress and cancellation

The long operations (C<convert>, C<compare>, C<commit>, C<rebase>, C<amend>, C<dd>, C<bench>) take
C<< progress => sub { my ($percent) = @_; ... } >>. The sub is called on the thread that called the operation,
never from a library thread (a report made on another thread would be queued and delivered on the calling
thread). B<A true return value cancels> the operation, which then dies with code C<Instar::E_CANCELLED>
(as in the C API and the Python binding); end the sub with C<return 0> to go on. An exception in the sub
cancels the operation and is rethrown unchanged once the library has returned.

=head1 FUNCTIONS

=over

=item info($filename, %opts)

The hash of C<qemu-img info --output=json> (keys as qemu-img names them; C<format-specific> decoded from
qemu-img's own JSON). With C<< backing_chain => 1 >>, an array reference of such hashes, top first. Options:
C<format>, C<force_share>, C<backing_chain>, C<key_secret>.

=item info_json($filename, %opts), info_human($filename, %opts)

The text of C<qemu-img info --output=json> / C<qemu-img info>, byte for byte.

=item map($filename, %opts)

An array reference of the entries of C<qemu-img map --output=json> (C<start>, C<length>, C<depth>, C<present>,
C<zero>, C<data>, C<offset>; also C<filename> when there is an offset). Options: C<format>, C<start_offset>,
C<max_length>, C<force_share>, C<key_secret>.

=item compare($file1, $file2, %opts)

C<< { identical, size_mismatch, mismatch_offset, message } >>. Options: C<format1>, C<format2>, C<strict>,
C<progress>, C<key_secret1>, C<key_secret2>.

=item convert($source, $target, %opts)

Like C<qemu-img convert>. Options: C<source_format> (-f), C<target_format> (-O), C<source_cache> (-T),
C<target_cache> (-t), C<sparse_size> (-S), C<options> (-o), C<backing_file> (-B), C<backing_format> (-F),
C<snapshot> (-l), C<coroutines> (-m), C<rate_limit> (-r, bytes per second), C<no_create> (-n),
C<target_is_zero>, C<compress> (-c), C<unordered_writes> (-W), C<bitmaps>, C<skip_broken_bitmaps>,
C<force_share> (-U), C<key_secret>, C<target_key_secret>, C<progress>, C<isolated> (the source is parsed
in the confined helper and read through it, docs/isolated.md; the other calls that open an image take it too).

=item create($filename, %opts)

Options: C<format>, C<size> (bytes), C<backing_file>, C<backing_format>, C<options>, C<no_backing_open> (-u),
C<key_secret>.

=item create_formatting($filename, %opts)

The same creation; returns the line C<qemu-img create> prints (C<Formatting 'PATH', fmt=... size=...>, with its
newline). When the creation fails after qemu-img would have printed that line, the C<Instar::Error> carries it as
C<< $err->{output} >>.

=item measure($filename_or_undef, %opts)

C<< { required, 'fully-allocated', bitmaps } >> as C<qemu-img measure --output=json>. Options:
C<source_format>, C<output_format>, C<options>, C<size> (when the filename is undef), C<force_share>,
C<key_secret>.

=item check($filename, %opts), check_json($filename, %opts), check_chain_json($filename, %opts)

C<check> returns the counters of C<qemu-img check --output=json> (keys as qemu-img names them) plus
C<exit_code>, qemu-img's exit status. C<check_json> returns qemu-img's JSON text; C<check_chain_json> returns
C<($json, $exit_code)> for the whole chain. Options: C<format>, C<repair> (C<Instar::CHECK_REPAIR_*>),
C<force_share>, C<no_cache>, C<key_secret>.

=item check_report($filename, %opts)

One check giving everything C<qemu-img check> reports: C<< {result => {...as check...}, json => TEXT,
messages => TEXT} >>, C<messages> being the lines qemu-img prints on stderr while it checks (C<ERROR ...>,
C<Leaked cluster ...>). Options as C<check>.

=item inspect($path, %opts)

Is the image safe to hand to qemu (C<instar_inspect>, docs/inspect.md)? Options: C<preset> (C<glance> the
default, also C<oslo>, C<vdsm>, C<nova>, C<cinder>, C<pve>), C<declared_format>, C<max_virtual_size>,
C<max_vmdk_extents>, C<fatal> (an array of violation code names, instead of the preset's choice; C<[]>: none).
Returns C<< {fatal, format, formats => [...], virtual_size, preset, violations => [{code, fatal, offset, field,
message}, ...]} >>; a fatal violation does not die, C<fatal> says so.

=item probe(\@regions, %opts)

Reads one structure of an image from bytes the caller already has (C<instar_probe>; nothing is read from disk):
C<@regions> are C<[$offset, $bytes]> pairs (at most 16). Options: C<format> (C<qcow2>, C<qed>, C<vhd>, C<vhdx>,
C<vmdk>, C<vdi>, C<iso>, C<gpt>, C<luks>), C<part> (default C<header>), C<qcow2_known_features>, C<vhdx_item>
(16 bytes), C<luks_passphrase>, C<luks_iter_limit>. Returns a hash: C<match> (true, false or undef when the
bytes cannot tell yet), C<virtual_size>, C<version>, C<violations> (C<INSTAR_PROBE_V_*> bits), C<need_offset>
and C<need_length> (the next bytes it needs), C<footer>, C<text>, C<payload_offset>, C<key_slot>,
C<subformat>, C<message> (the first violation as oslo.utils words it), C<sectors>, and C<payload> for the luks
C<payload> part.

=item resize($filename, $size, %opts)

Options: C<format>, C<preallocation>, C<relative> (C<$size> is a signed change), C<shrink>, C<key_secret>.

=item amend($filename, %opts)

Options: C<format>, C<options>, C<force>, C<progress>, C<key_secret>, C<new_secret> and C<old_secret> (the
passphrases of LUKS key slots being added or erased).

=item commit($filename, %opts), rebase($filename, %opts)

commit: C<format>, C<base>, C<cache>, C<rate_limit>, C<no_empty> (-d), C<progress>, C<key_secret>.
rebase: C<format>, C<backing_file> (-b; C<''> makes the image standalone), C<backing_format> (-F), C<cache>,
C<source_cache>, C<unsafe> (-u), C<force_share>, C<progress>, C<key_secret>.

=item snapshot_list($filename, %opts), snapshot_create/snapshot_apply/snapshot_delete($filename, $name, %opts)

C<snapshot_list> returns the snapshots as C<qemu-img info> names their keys.

=item bitmap($filename, $bitmap, \@actions, %opts)

Actions are names (C<add>, C<remove>, C<clear>, C<enable>, C<disable>) or C<< [merge => $source_bitmap] >>.
Options: C<format>, C<granularity>, C<source_file>, C<source_format>, C<key_secret>.

=item dd($input, $output, %opts)

Options: C<input_format>, C<output_format>, C<block_size>, C<count>, C<skip>, C<output_size>, C<input_size>,
C<snapshot>, C<no_create>, C<force_share>, C<progress>, C<key_secret>.

=item bench($filename, %opts)

C<< { requests, bytes, seconds } >>. Options as in C<instar_bench_options_t>.

=item version(), strerror($code)

=item object_add($definition), object_del($id)

qemu-img's C<--object> for the whole process (C<instar_object_add>): C<< object_add("secret,id=sec0,data=...") >>,
C<< object_add("tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=client") >> or C<tls-creds-psk,...>; later
calls find it by id (an nbd node's C<tls-creds>, C<key-secret> and C<encrypt.key-secret> in json: names and option
lists). Dies with qemu-img's message for a duplicate id or an unknown type.

=back

=head2 Instar::Image

C<< Instar::Image->open($path, %opts) >> (C<format>, C<key_secret>, C<flags> or C<read_write>, C<force_share>,
C<no_backing>, C<no_cache>) returns a handle with C<size>, C<read($count, $offset)>, C<write($data, $offset)>,
C<write_zeroes($count, $offset, $flags)>, C<discard($count, $offset)>, C<flush>, C<block_status($offset, $count)>,
C<info>, C<map> and C<close> (also called by C<DESTROY>).

C<block_status($offset, $count)> is C<instar_block_status>: the status of the guest range at C<$offset> (at most
C<$count> bytes, which must lie inside the image) across the backing chain, as qemu-nbd serves base:allocation.
It returns C<< { length, flags, depth, allocated, data, zero, eof } >>: C<length> bytes from C<$offset> share
C<flags> (C<Instar::STATUS_ALLOCATED>, C<STATUS_DATA>, C<STATUS_ZERO>, C<STATUS_EOF>), whose bits are also given
as the booleans C<allocated> (qemu-img map's "present"), C<data>, C<zero> and C<eof>; C<depth> is the backing
link of the layer that decides the range (0: the top). Call it again from C<$offset + length> for the rest:

    my ($off, $size) = (0, $img->size);
    while ($off < $size) {
        my $st = $img->block_status($off, $size - $off);
        printf "%d+%d %s\n", $off, $st->{length}, $st->{data} ? 'data' : 'hole';
        $off += $st->{length};
    }

=head1 SEE ALSO

L<Instar::PVE>, drop-in replacements for the qemu-img calls of Proxmox VE.

=cut

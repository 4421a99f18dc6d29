use strict;
use warnings;
use Test::More;

use Instar;
use Instar::PVE;
ok(defined &Instar::info && defined &Instar::PVE::qemu_img_info, 'modules load');

like(Instar::version(), qr/^\d+\.\d+\.\d+$/, 'version is MAJOR.MINOR.PATCH');
is(Instar::strerror(0) ne '', 1, 'strerror(0) is a text');
isnt(Instar::strerror(Instar::E_NOT_FOUND), Instar::strerror(Instar::E_IO), 'codes have their own texts');
is(Instar::E_CANCELLED, -8, 'E_CANCELLED matches instar.h');
is(Instar::OPEN_READ_WRITE, 1, 'OPEN_READ_WRITE matches instar.h');

done_testing;

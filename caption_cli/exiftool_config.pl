#------------------------------------------------------------------------------
# exiftool configuration shipped with caption-cli (loaded with `exiftool -config`).
#
# 1. The caption-cli XMP namespace (prefix "captioncli"): the provenance mark that
#    lets a later run tell our machine-written captions from a person's words.
#      captioncli:Caption   the exact text caption-cli wrote into the description
#      captioncli:Model     the model that wrote it
#      captioncli:Software  "caption-cli <version>"
#    Any exiftool reads these back without this file (as XMP-captioncli:*); the
#    definition is only needed to WRITE them.
# 2. Iptc4xmpCore:AltTextAccessibility (IPTC Photo Metadata 2021.1) as a lang-alt
#    tag, so exiftool releases older than the IPTC Core 1.3 tables can write it
#    too. Same namespace, same property, same type as exiftool's own definition.
# 3. MWG "strict" mode off: caption-cli loads the MWG module (`-use MWG`) to write
#    MWG:Description, but still wants to READ metadata wherever a file keeps it.
#------------------------------------------------------------------------------

%Image::ExifTool::UserDefined = (
    'Image::ExifTool::XMP::Main' => {
        captioncli => {
            SubDirectory => { TagTable => 'Image::ExifTool::UserDefined::captioncli' },
        },
    },
    'Image::ExifTool::XMP::iptcCore' => {
        AltTextAccessibility => { Groups => { 2 => 'Other' }, Writable => 'lang-alt' },
    },
);

%Image::ExifTool::UserDefined::captioncli = (
    GROUPS    => { 0 => 'XMP', 1 => 'XMP-captioncli', 2 => 'Image' },
    NAMESPACE => { 'captioncli' => 'https://ns.caption-cli.invalid/xmp/1.0/' },
    WRITABLE  => 'string',
    Caption   => { },
    Model     => { },
    Software  => { },
);

$Image::ExifTool::MWG::strict = 0;

1;  # end

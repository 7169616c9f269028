"""Pipelines with the files they read (attachments), through the real server:
stored by checksum, part of the pipeline's identity, listed, handed to every
claim; a pipeline that reads a file nobody attached is refused."""

from __future__ import annotations

import hashlib

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.catalog import domain as d
from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, pipeline, ready_sites, refused, sha

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CSV = b"Well,Treatment\nA01,DMSO\nA02,drug\n"
IMPORT = (
    "Metadata",
    [
        ("Extract metadata?", "Yes"),
        ("Metadata extraction method", "Import from file"),
        ("Metadata file location", "Default Input Folder|"),
        ("Match file and image metadata", "[]"),
        ("Metadata file name", "plate_map.csv"),
    ],
)
ILLUM_NAT = (
    "NamesAndTypes",
    [
        ("Assign a name to", "Images matching rules"),
        ("Select the rule criteria", 'and (file does contain "DNA")'),
        ("Name to assign these images", "DNA"),
        ("Select the image type", "Grayscale image"),
        ("Select the rule criteria", 'and (file does startwith "illum") (file does endwith ".npy")'),
        ("Name to assign these images", "IllumDNA"),
        ("Select the image type", "Illumination function"),
    ],
)


def with_import() -> bytes:
    return pipeline(images=("DNA",), extra=[IMPORT])


async def register(
    catalog: Catalog, content: bytes, *attachments: catalog_pb2.Attachment, name: str = "t"
) -> catalog_pb2.RegisterPipelineResponse:
    return await catalog.stub.RegisterPipeline(
        catalog_pb2.RegisterPipelineRequest(name=name, content=content, attachments=list(attachments))
    )


def attach(name: str, content: bytes) -> catalog_pb2.Attachment:
    return catalog_pb2.Attachment(name=name, content=content)


def manifest_sha(content: bytes, files: dict[str, bytes]) -> str:
    lines = ["cellmesh pipeline v1", f"cppipe {sha(content)}"]
    lines += [f"attachment {sha(files[n])} {n}" for n in sorted(files)]
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


async def test_a_metadata_csv_that_is_not_attached_is_refused(catalog: Catalog) -> None:
    with refused(
        INVALID,
        "`Metadata` (module 6) setting 'Metadata file name' imports plate_map.csv from the Default Input "
        "Folder, which is not attached: attach it with --attach plate_map.csv",
    ):
        await register(catalog, with_import())
    with refused(INVALID, "attach it with --attach plate_map.csv"):
        await register(catalog, with_import(), attach("other.csv", CSV))
    assert (await catalog.stub.ListPipelines(catalog_pb2.ListPipelinesRequest())).pipelines == []


async def test_attachments_are_stored_by_checksum_listed_and_part_of_the_identity(catalog: Catalog) -> None:
    content = with_import()
    reply = await register(catalog, content, attach("plate_map.csv", CSV), attach("notes/readme.txt", b"hi"))
    p = reply.pipeline
    assert not reply.already_registered
    assert p.ref.sha256 == manifest_sha(content, {"plate_map.csv": CSV, "notes/readme.txt": b"hi"})
    assert p.ref.sha256 == d.pipeline_sha256(
        sha(content),
        [d.InputFile("plate_map.csv", "", 0, sha(CSV)), d.InputFile("notes/readme.txt", "", 0, sha(b"hi"))],
    )
    assert p.ref.content_sha256 == sha(content)
    assert p.ref.key == f"pipelines/{sha(content)}.cppipe"
    assert await catalog.objects.get_bytes(p.ref.key, expected_sha256=sha(content)) == content
    assert [(a.name, a.object.key, a.object.size, a.object.sha256) for a in p.attachments] == [
        ("plate_map.csv", f"attachments/{sha(CSV)}", len(CSV), sha(CSV)),
        ("notes/readme.txt", f"attachments/{sha(b'hi')}", 2, sha(b"hi")),
    ]
    assert await catalog.objects.get_bytes(f"attachments/{sha(CSV)}", expected_sha256=sha(CSV)) == CSV

    # The same files in another order: the same pipeline.
    again = await register(catalog, content, attach("notes/readme.txt", b"hi"), attach("plate_map.csv", CSV))
    assert again.already_registered and again.pipeline == p
    # Other bytes under the same name, or the same bytes under another name: another pipeline.
    other = (await register(catalog, content, attach("plate_map.csv", CSV + b"A03,drug\n"))).pipeline
    assert other.ref.sha256 not in (p.ref.sha256, sha(content))
    assert other.ref.key == p.ref.key  # one stored copy of the .cppipe
    listed = (await catalog.stub.ListPipelines(catalog_pb2.ListPipelinesRequest())).pipelines
    assert {x.ref.sha256 for x in listed} == {p.ref.sha256, other.ref.sha256}
    got = (await catalog.stub.GetPipeline(catalog_pb2.GetPipelineRequest(sha256=p.ref.sha256))).pipeline
    assert got == p


async def test_a_pipeline_without_attachments_keeps_its_content_sha(catalog: Catalog) -> None:
    content = pipeline()
    p = (await register(catalog, content)).pipeline
    assert p.ref.sha256 == sha(content) and p.ref.content_sha256 == "" and list(p.attachments) == []


async def test_claims_carry_the_attachments(catalog: Catalog) -> None:
    content = pipeline(images=("DNA", "GFP"), extra=[IMPORT])
    pipe = (await register(catalog, content, attach("plate_map.csv", CSV))).pipeline
    await catalog.stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(name="P1", channels=["DNA", "GFP"], pipeline_sha256=pipe.ref.sha256)
    )
    await ready_sites(catalog.stub, "P1", 2)
    claims = await claim_all(catalog.stub)
    assert len(claims) == 2
    for claim in claims:
        assert list(claim.input_files) == list(pipe.attachments)
        assert claim.pipeline.sha256 == pipe.ref.sha256
        assert claim.pipeline.content_sha256 == sha(content)


async def test_an_attached_illumination_function_is_not_a_channel(catalog: Catalog) -> None:
    base = pipeline(images=("DNA",)).decode()
    start = base.index("NamesAndTypes:")
    end = base.index("Groups:")
    nat = "NamesAndTypes:" + base[start + len("NamesAndTypes:") :].split("\n", 1)[0] + "\n"
    nat += "".join(f"    {k}:{v}\n" for k, v in ILLUM_NAT[1])
    content = (base[:start] + nat + "\n" + base[end:]).encode()
    with refused(INVALID, "the Images module's filter drops the attachment illum_dna.npy"):
        await register(catalog, content, attach("illum_dna.npy", b"\x93NUMPY"))
    custom = 'Filter images?:Custom\n    Select the rule criteria:or (extension does isimage) (file does endwith ".npy")'
    content = content.replace(b"Filter images?:Images only", custom.encode())
    with refused(INVALID, "assigns IllumDNA to an illumination function", "--attach illum.npy"):
        await register(catalog, content)
    p = (await register(catalog, content, attach("illum_dna.npy", b"\x93NUMPY"))).pipeline
    assert list(p.image_names) == ["DNA"]
    plate = await catalog.stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(name="P2", channels=["DNA"], pipeline_sha256=p.ref.sha256)
    )
    assert plate.plate.channels == ["DNA"]


async def test_big_attachments_come_as_stored_objects(catalog: Catalog) -> None:
    data = b"x" * (5 * 1024 * 1024)
    with refused(INVALID, "attachment plate_map.csv is 5242880 bytes: send files over 4 MiB as an object"):
        await register(catalog, with_import(), attach("plate_map.csv", data))
    stored = await catalog.objects.put_bytes(f"attachments/{sha(data)}", data, if_absent=True)
    ref = types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256=stored.sha256)
    p = (
        await register(catalog, with_import(), catalog_pb2.Attachment(name="plate_map.csv", object=ref))
    ).pipeline
    assert p.attachments[0].object == ref
    wrong = types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256="0" * 64)
    with refused(INVALID, "attachment plate_map.csv:", "SHA-256 is"):
        await register(catalog, with_import(), catalog_pb2.Attachment(name="plate_map.csv", object=wrong))
    missing = types_pb2.ObjectRef(key="attachments/nothing", size=3, sha256="0" * 64)
    with refused(INVALID, "no object attachments/nothing in the object store; upload it first"):
        await register(catalog, with_import(), catalog_pb2.Attachment(name="plate_map.csv", object=missing))
    short = types_pb2.ObjectRef(key=stored.key, size=3, sha256=stored.sha256)
    with refused(INVALID, f"has {len(data)} bytes, not 3"):
        await register(catalog, with_import(), catalog_pb2.Attachment(name="plate_map.csv", object=short))


async def test_attachment_names_are_checked(catalog: Catalog) -> None:
    for name in ("../x.csv", "/etc/passwd", ".hidden", ""):
        with refused(INVALID, "input file"):
            await register(catalog, pipeline(), attach(name, b"x"))
    with refused(INVALID, "attachment a.csv is given twice"):
        await register(catalog, pipeline(), attach("a.csv", b"x"), attach("a.csv", b"y"))
    with refused(INVALID, "has neither content nor object"):
        await register(catalog, pipeline(), catalog_pb2.Attachment(name="a.csv"))


async def test_a_pipeline_that_only_saves_images_is_accepted(catalog: Catalog) -> None:
    save = [
        ("Select the type of image to save", "Image"),
        ("Select the image to save", "DNA"),
        ("Output file location", "Default Output Folder|"),
    ]
    content = pipeline(images=("DNA", "GFP")).decode()
    start = content.index("ExportToSpreadsheet:")
    content = content[:start] + content[start:].replace("ExportToSpreadsheet:", "SaveImages:", 1)
    head, _, _ = content.partition("SaveImages:")
    attrs = content[len(head) :].split("\n", 1)[0]
    content = head + attrs + "\n" + "".join(f"    {k}:{v}\n" for k, v in save)
    p = (await register(catalog, content.encode())).pipeline
    assert list(p.tables) == [] and p.modules[-1] == "SaveImages"
    await catalog.stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(name="P3", channels=["DNA", "GFP"], pipeline_sha256=p.ref.sha256)
    )
    await ready_sites(catalog.stub, "P3", 1)
    (claim,) = await claim_all(catalog.stub)
    assert list(claim.expected_tables) == []


async def test_files_from_an_earlier_plate_stage_are_declared(catalog: Catalog) -> None:
    """A site pipeline that reads the illumination function a plate stage
    writes names it in stage_inputs; it never runs as a plate's first stage."""
    base = pipeline(images=("DNA",), note="analysis").decode()
    start, end = base.index("NamesAndTypes:"), base.index("Groups:")
    nat = "NamesAndTypes:" + base[start + len("NamesAndTypes:") :].split("\n", 1)[0] + "\n"
    nat += (
        "".join(f"    {k}:{v}\n" for k, v in ILLUM_NAT[1])
        .replace(
            'and (file does startwith "illum") (file does endwith ".npy")',
            'and (file does eq "IllumDNA.npy")',
        )
        .replace('and (file does contain "DNA")\n', 'and (file does contain "DNA") (extension does istif)\n')
    )
    content = (base[:start] + nat + "\n" + base[end:]).encode()
    content = content.replace(
        b"Filter images?:Images only",
        b'Filter images?:Custom\n    Select the rule criteria:or (extension does isimage) (file does endwith ".npy")',
    )
    with refused(INVALID, "assigns IllumDNA to an illumination function"):
        await register(catalog, content)
    reply = await catalog.stub.RegisterPipeline(
        catalog_pb2.RegisterPipelineRequest(name="analysis", content=content, stage_inputs=["IllumDNA.npy"])
    )
    analysis = reply.pipeline
    assert list(analysis.stage_inputs) == ["IllumDNA.npy"] and list(analysis.image_names) == ["DNA"]
    assert analysis.ref.sha256 == sha(content)  # not part of the identity
    with refused(
        INVALID, "reads IllumDNA.npy from an earlier plate stage", "runs no plate-scope stage before it"
    ):
        await catalog.stub.CreatePlate(
            catalog_pb2.CreatePlateRequest(name="S1", channels=["DNA"], pipeline_sha256=analysis.ref.sha256)
        )
    stage = (
        await catalog.stub.RegisterPipeline(
            catalog_pb2.RegisterPipelineRequest(
                name="illum",
                content=pipeline(images=("DNA",), note="illum"),
                scope=types_pb2.PIPELINE_SCOPE_PLATE,
            )
        )
    ).pipeline
    await catalog.stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(name="S1", channels=["DNA"], pipeline_sha256=stage.ref.sha256)
    )
    added = await catalog.stub.AddPlatePipeline(
        catalog_pb2.AddPlatePipelineRequest(plate="S1", pipeline_sha256=analysis.ref.sha256)
    )
    assert list(added.plate.pipeline_sha256) == [stage.ref.sha256, analysis.ref.sha256]

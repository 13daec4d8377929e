// Behavioural models of the two ECP5 primitives Yosys ships only as black boxes (MULT18X18D, DP16KD),
// for what its ECP5 flow makes of ambert: an 18 x 18 multiply (mul2dsp -> MULT18X18D, no register; or
// instantiated by hw.mac.registered_product with its input and output registers), and block RAMs of
// 18-bit true dual ports or a 36-bit write / 36-bit read pseudo dual port, unregistered outputs (Yosys'),
// or 9-bit ports with port B's output registered (hw.bufpool.registered_bram's). Anything else stops
// the simulation with a message instead of running wrongly.
// Port names and parameters as in Yosys' share/lattice/cells_bb_ecp5.v; used by boards/postsynth.py.
// Written from the ECP5 memory and DSP usage guides as Yosys maps to them (share/lattice/
// brams_map_16kd.v, dsp_map_18x18.v): in x18 mode AD[13:4] is the word, AD[1:0] the byte (9-bit)
// write enables; in x36 mode AD[13:5] the word, port A writes DI = {DIB, DIA} under the byte enables
// ADA[3:0], port B reads DO = {DOB, DOA}; in x9 mode AD[13:3] the word. With REGMODE OUTREG a port's
// output register takes the word read a cycle later (on OCE; RST clears it). Contents start at zero
// (INITVAL is not modelled: ambert's memories have no initial contents).

module MULT18X18D(
  A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2, A1, A0, B17, B16, B15, B14, B13,
  B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2, B1, B0, C17, C16, C15, C14, C13, C12, C11, C10, C9, C8, C7,
  C6, C5, C4, C3, C2, C1, C0, SIGNEDA, SIGNEDB, SOURCEA, SOURCEB, CLK3, CLK2, CLK1, CLK0, CE3, CE2, CE1, CE0,
  RST3, RST2, RST1, RST0, SRIA17, SRIA16, SRIA15, SRIA14, SRIA13, SRIA12, SRIA11, SRIA10, SRIA9, SRIA8,
  SRIA7, SRIA6, SRIA5, SRIA4, SRIA3, SRIA2, SRIA1, SRIA0, SRIB17, SRIB16, SRIB15, SRIB14, SRIB13, SRIB12,
  SRIB11, SRIB10, SRIB9, SRIB8, SRIB7, SRIB6, SRIB5, SRIB4, SRIB3, SRIB2, SRIB1, SRIB0, SROA17, SROA16,
  SROA15, SROA14, SROA13, SROA12, SROA11, SROA10, SROA9, SROA8, SROA7, SROA6, SROA5, SROA4, SROA3, SROA2,
  SROA1, SROA0, SROB17, SROB16, SROB15, SROB14, SROB13, SROB12, SROB11, SROB10, SROB9, SROB8, SROB7, SROB6,
  SROB5, SROB4, SROB3, SROB2, SROB1, SROB0, ROA17, ROA16, ROA15, ROA14, ROA13, ROA12, ROA11, ROA10, ROA9,
  ROA8, ROA7, ROA6, ROA5, ROA4, ROA3, ROA2, ROA1, ROA0, ROB17, ROB16, ROB15, ROB14, ROB13, ROB12, ROB11,
  ROB10, ROB9, ROB8, ROB7, ROB6, ROB5, ROB4, ROB3, ROB2, ROB1, ROB0, ROC17, ROC16, ROC15, ROC14, ROC13,
  ROC12, ROC11, ROC10, ROC9, ROC8, ROC7, ROC6, ROC5, ROC4, ROC3, ROC2, ROC1, ROC0, P35, P34, P33, P32, P31,
  P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20, P19, P18, P17, P16, P15, P14, P13, P12, P11, P10,
  P9, P8, P7, P6, P5, P4, P3, P2, P1, P0, SIGNEDP
);
  input A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6;
  input A5, A4, A3, A2, A1, A0, B17, B16, B15, B14, B13, B12;
  input B11, B10, B9, B8, B7, B6, B5, B4, B3, B2, B1, B0;
  input C17, C16, C15, C14, C13, C12, C11, C10, C9, C8, C7, C6;
  input C5, C4, C3, C2, C1, C0, SIGNEDA, SIGNEDB, SOURCEA, SOURCEB, CLK3, CLK2;
  input CLK1, CLK0, CE3, CE2, CE1, CE0, RST3, RST2, RST1, RST0, SRIA17, SRIA16;
  input SRIA15, SRIA14, SRIA13, SRIA12, SRIA11, SRIA10, SRIA9, SRIA8, SRIA7, SRIA6, SRIA5, SRIA4;
  input SRIA3, SRIA2, SRIA1, SRIA0, SRIB17, SRIB16, SRIB15, SRIB14, SRIB13, SRIB12, SRIB11, SRIB10;
  input SRIB9, SRIB8, SRIB7, SRIB6, SRIB5, SRIB4, SRIB3, SRIB2, SRIB1, SRIB0;
  output SROA17, SROA16, SROA15, SROA14, SROA13, SROA12, SROA11, SROA10, SROA9, SROA8, SROA7, SROA6;
  output SROA5, SROA4, SROA3, SROA2, SROA1, SROA0, SROB17, SROB16, SROB15, SROB14, SROB13, SROB12;
  output SROB11, SROB10, SROB9, SROB8, SROB7, SROB6, SROB5, SROB4, SROB3, SROB2, SROB1, SROB0;
  output ROA17, ROA16, ROA15, ROA14, ROA13, ROA12, ROA11, ROA10, ROA9, ROA8, ROA7, ROA6;
  output ROA5, ROA4, ROA3, ROA2, ROA1, ROA0, ROB17, ROB16, ROB15, ROB14, ROB13, ROB12;
  output ROB11, ROB10, ROB9, ROB8, ROB7, ROB6, ROB5, ROB4, ROB3, ROB2, ROB1, ROB0;
  output ROC17, ROC16, ROC15, ROC14, ROC13, ROC12, ROC11, ROC10, ROC9, ROC8, ROC7, ROC6;
  output ROC5, ROC4, ROC3, ROC2, ROC1, ROC0, P35, P34, P33, P32, P31, P30;
  output P29, P28, P27, P26, P25, P24, P23, P22, P21, P20, P19, P18;
  output P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6;
  output P5, P4, P3, P2, P1, P0, SIGNEDP;
  parameter REG_INPUTA_CLK = "NONE";
  parameter REG_INPUTA_CE = "CE0";
  parameter REG_INPUTA_RST = "RST0";
  parameter REG_INPUTB_CLK = "NONE";
  parameter REG_INPUTB_CE = "CE0";
  parameter REG_INPUTB_RST = "RST0";
  parameter REG_INPUTC_CLK = "NONE";
  parameter REG_INPUTC_CE = "CE0";
  parameter REG_INPUTC_RST = "RST0";
  parameter REG_PIPELINE_CLK = "NONE";
  parameter REG_PIPELINE_CE = "CE0";
  parameter REG_PIPELINE_RST = "RST0";
  parameter REG_OUTPUT_CLK = "NONE";
  parameter REG_OUTPUT_CE = "CE0";
  parameter REG_OUTPUT_RST = "RST0";
  parameter CLK0_DIV = "ENABLED";
  parameter CLK1_DIV = "ENABLED";
  parameter CLK2_DIV = "ENABLED";
  parameter CLK3_DIV = "ENABLED";
  parameter HIGHSPEED_CLK = "NONE";
  parameter GSR = "ENABLED";
  parameter CAS_MATCH_REG = "FALSE";
  parameter SOURCEB_MODE = "B_SHIFT";
  parameter MULT_BYPASS = "DISABLED";
  parameter RESETMODE = "SYNC";

  // the multiply, its A and B inputs and its P output each registered on CLK0 or not (ambert's
  // registered multiplies, hw.mac.registered_product, all three); the registers' enable CE0 and
  // synchronous reset RST0
  initial begin
    if (REG_INPUTA_CLK != "NONE" && REG_INPUTA_CLK != "CLK0" || REG_INPUTB_CLK != "NONE" && REG_INPUTB_CLK != "CLK0"
        || REG_OUTPUT_CLK != "NONE" && REG_OUTPUT_CLK != "CLK0" || REG_INPUTC_CLK != "NONE"
        || REG_PIPELINE_CLK != "NONE" || MULT_BYPASS != "DISABLED")
      $fatal(1, "MULT18X18D model: only the multiply, its inputs and output unregistered or on CLK0");
    if (REG_INPUTA_CE != "CE0" || REG_INPUTB_CE != "CE0" || REG_OUTPUT_CE != "CE0" || REG_INPUTA_RST != "RST0"
        || REG_INPUTB_RST != "RST0" || REG_OUTPUT_RST != "RST0" || RESETMODE != "SYNC")
      $fatal(1, "MULT18X18D model: only registers enabled by CE0 and reset by RST0, synchronously");
  end

  wire [17:0] a_in = {A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2, A1, A0};
  wire [17:0] b_in = {B17, B16, B15, B14, B13, B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2, B1, B0};
  reg [17:0] a_reg = 0, b_reg = 0;
  reg sa_reg = 0, sb_reg = 0;
  reg [35:0] p_reg = 0;
  wire [17:0] a = REG_INPUTA_CLK == "CLK0" ? a_reg : a_in;
  wire [17:0] b = REG_INPUTB_CLK == "CLK0" ? b_reg : b_in;
  // (the signedness of each input travels with it through its register)
  wire sa = REG_INPUTA_CLK == "CLK0" ? sa_reg : SIGNEDA;
  wire sb = REG_INPUTB_CLK == "CLK0" ? sb_reg : SIGNEDB;
  wire signed [36:0] a_ext = sa ? {{19{a[17]}}, a} : {19'b0, a};
  wire signed [36:0] b_ext = sb ? {{19{b[17]}}, b} : {19'b0, b};
  wire signed [73:0] product = a_ext * b_ext;
  always @(posedge CLK0) begin
    if (RST0) begin
      a_reg <= 0; b_reg <= 0; sa_reg <= 0; sb_reg <= 0; p_reg <= 0;
    end else if (CE0) begin
      a_reg <= a_in; b_reg <= b_in; sa_reg <= SIGNEDA; sb_reg <= SIGNEDB; p_reg <= product[35:0];
    end
  end
  wire [35:0] p = REG_OUTPUT_CLK == "CLK0" ? p_reg : product[35:0];
  assign {P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20, P19, P18, P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2, P1, P0} = p;
  assign SIGNEDP = SIGNEDA | SIGNEDB;
  assign {SROA17, SROA16, SROA15, SROA14, SROA13, SROA12, SROA11, SROA10, SROA9, SROA8, SROA7, SROA6, SROA5, SROA4, SROA3, SROA2, SROA1, SROA0} = 18'b0;
  assign {SROB17, SROB16, SROB15, SROB14, SROB13, SROB12, SROB11, SROB10, SROB9, SROB8, SROB7, SROB6, SROB5, SROB4, SROB3, SROB2, SROB1, SROB0} = 18'b0;
  assign {ROA17, ROA16, ROA15, ROA14, ROA13, ROA12, ROA11, ROA10, ROA9, ROA8, ROA7, ROA6, ROA5, ROA4, ROA3, ROA2, ROA1, ROA0} = a;
  assign {ROB17, ROB16, ROB15, ROB14, ROB13, ROB12, ROB11, ROB10, ROB9, ROB8, ROB7, ROB6, ROB5, ROB4, ROB3, ROB2, ROB1, ROB0} = b;
  assign {ROC17, ROC16, ROC15, ROC14, ROC13, ROC12, ROC11, ROC10, ROC9, ROC8, ROC7, ROC6, ROC5, ROC4, ROC3, ROC2, ROC1, ROC0} = 18'b0;
endmodule

module DP16KD(
  DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5, DIA4, DIA3, DIA2,
  DIA1, DIA0, ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0, CEA,
  OCEA, CLKA, WEA, RSTA, CSA2, CSA1, CSA0, DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9,
  DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0, ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6,
  ADB5, ADB4, ADB3, ADB2, ADB1, ADB0, CEB, OCEB, CLKB, WEB, RSTB, CSB2, CSB1, CSB0, DOA17, DOA16, DOA15,
  DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5, DOA4, DOA3, DOA2, DOA1, DOA0, DOB17,
  DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1,
  DOB0
);
  input DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6;
  input DIA5, DIA4, DIA3, DIA2, DIA1, DIA0, ADA13, ADA12, ADA11, ADA10, ADA9, ADA8;
  input ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0, CEA, OCEA, CLKA, WEA;
  input RSTA, CSA2, CSA1, CSA0, DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10;
  input DIB9, DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0, ADB13, ADB12;
  input ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0;
  input CEB, OCEB, CLKB, WEB, RSTB, CSB2, CSB1, CSB0;
  output DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6;
  output DOA5, DOA4, DOA3, DOA2, DOA1, DOA0, DOB17, DOB16, DOB15, DOB14, DOB13, DOB12;
  output DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1, DOB0;
  parameter DATA_WIDTH_A = 18;
  parameter DATA_WIDTH_B = 18;
  parameter REGMODE_A = "NOREG";
  parameter REGMODE_B = "NOREG";
  parameter RESETMODE = "SYNC";
  parameter ASYNC_RESET_RELEASE = "SYNC";
  parameter CSDECODE_A = "0b000";
  parameter CSDECODE_B = "0b000";
  parameter WRITEMODE_A = "NORMAL";
  parameter WRITEMODE_B = "NORMAL";
  parameter CLKAMUX = "CLKA";
  parameter CLKBMUX = "CLKB";
  parameter GSR = "ENABLED";
  parameter INITVAL_00 = 320'h0;
  parameter INITVAL_01 = 320'h0;
  parameter INITVAL_02 = 320'h0;
  parameter INITVAL_03 = 320'h0;
  parameter INITVAL_04 = 320'h0;
  parameter INITVAL_05 = 320'h0;
  parameter INITVAL_06 = 320'h0;
  parameter INITVAL_07 = 320'h0;
  parameter INITVAL_08 = 320'h0;
  parameter INITVAL_09 = 320'h0;
  parameter INITVAL_0A = 320'h0;
  parameter INITVAL_0B = 320'h0;
  parameter INITVAL_0C = 320'h0;
  parameter INITVAL_0D = 320'h0;
  parameter INITVAL_0E = 320'h0;
  parameter INITVAL_0F = 320'h0;
  parameter INITVAL_10 = 320'h0;
  parameter INITVAL_11 = 320'h0;
  parameter INITVAL_12 = 320'h0;
  parameter INITVAL_13 = 320'h0;
  parameter INITVAL_14 = 320'h0;
  parameter INITVAL_15 = 320'h0;
  parameter INITVAL_16 = 320'h0;
  parameter INITVAL_17 = 320'h0;
  parameter INITVAL_18 = 320'h0;
  parameter INITVAL_19 = 320'h0;
  parameter INITVAL_1A = 320'h0;
  parameter INITVAL_1B = 320'h0;
  parameter INITVAL_1C = 320'h0;
  parameter INITVAL_1D = 320'h0;
  parameter INITVAL_1E = 320'h0;
  parameter INITVAL_1F = 320'h0;
  parameter INITVAL_20 = 320'h0;
  parameter INITVAL_21 = 320'h0;
  parameter INITVAL_22 = 320'h0;
  parameter INITVAL_23 = 320'h0;
  parameter INITVAL_24 = 320'h0;
  parameter INITVAL_25 = 320'h0;
  parameter INITVAL_26 = 320'h0;
  parameter INITVAL_27 = 320'h0;
  parameter INITVAL_28 = 320'h0;
  parameter INITVAL_29 = 320'h0;
  parameter INITVAL_2A = 320'h0;
  parameter INITVAL_2B = 320'h0;
  parameter INITVAL_2C = 320'h0;
  parameter INITVAL_2D = 320'h0;
  parameter INITVAL_2E = 320'h0;
  parameter INITVAL_2F = 320'h0;
  parameter INITVAL_30 = 320'h0;
  parameter INITVAL_31 = 320'h0;
  parameter INITVAL_32 = 320'h0;
  parameter INITVAL_33 = 320'h0;
  parameter INITVAL_34 = 320'h0;
  parameter INITVAL_35 = 320'h0;
  parameter INITVAL_36 = 320'h0;
  parameter INITVAL_37 = 320'h0;
  parameter INITVAL_38 = 320'h0;
  parameter INITVAL_39 = 320'h0;
  parameter INITVAL_3A = 320'h0;
  parameter INITVAL_3B = 320'h0;
  parameter INITVAL_3C = 320'h0;
  parameter INITVAL_3D = 320'h0;
  parameter INITVAL_3E = 320'h0;
  parameter INITVAL_3F = 320'h0;

  localparam X36 = DATA_WIDTH_A == 36;
  localparam X9 = DATA_WIDTH_A == 9;
  // the contents as 1024 words of 18 bits; a 36-bit word w is {mem[2w + 1], mem[2w]}
  reg [17:0] mem [0:1023];
  // in x9 mode, 2048 words of 9 bits
  reg [8:0] mem9 [0:2047];
  integer i;
  initial begin
    if (!((DATA_WIDTH_A == 18 && DATA_WIDTH_B == 18) || (DATA_WIDTH_A == 36 && DATA_WIDTH_B == 36)
          || (DATA_WIDTH_A == 9 && DATA_WIDTH_B == 9)))
      $fatal(1, "DP16KD model: data widths %0d/%0d are not modelled", DATA_WIDTH_A, DATA_WIDTH_B);
    if (REGMODE_A != "NOREG" && REGMODE_A != "OUTREG" || REGMODE_B != "NOREG" && REGMODE_B != "OUTREG"
        || (REGMODE_A == "OUTREG" || REGMODE_B == "OUTREG") && RESETMODE != "SYNC")
      $fatal(1, "DP16KD model: only unregistered outputs or output registers reset synchronously");
    if (CSDECODE_A != "0b000" || CSDECODE_B != "0b000" || CLKAMUX != "CLKA" || CLKBMUX != "CLKB")
      $fatal(1, "DP16KD model: chip-select decoding and inverted clocks are not modelled");
    for (i = 0; i < 1024; i = i + 1) mem[i] = 18'b0;
    for (i = 0; i < 2048; i = i + 1) mem9[i] = 9'b0;
  end

  wire [13:0] ada = {ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0};
  wire [13:0] adb = {ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0};
  wire [17:0] dia = {DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0};
  wire [17:0] dib = {DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0};
  reg [17:0] doa, dob;
  reg [17:0] doa_q = 0, dob_q = 0;
  assign {DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5, DOA4, DOA3, DOA2, DOA1, DOA0} = REGMODE_A == "OUTREG" ? doa_q : doa;
  assign {DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1, DOB0} = REGMODE_B == "OUTREG" ? dob_q : dob;

  function [17:0] merge(input [17:0] old, input [17:0] data, input [1:0] be);
    merge = {be[1] ? data[17:9] : old[17:9], be[0] ? data[8:0] : old[8:0]};
  endfunction

  always @(posedge CLKA) begin
    if (RSTA && REGMODE_A != "OUTREG") $fatal(1, "DP16KD model: RSTA is modelled only with an output register");
    if (RSTA) doa_q <= 0;
    else if (OCEA) doa_q <= doa;
    if (CEA) begin
      if (X9) begin
        if (WEA) begin
          mem9[ada[13:3]] <= dia[8:0];
          if (WRITEMODE_A == "READBEFOREWRITE") doa <= {9'b0, mem9[ada[13:3]]};
          else if (WRITEMODE_A == "WRITETHROUGH") doa <= {9'b0, dia[8:0]};
        end else
          doa <= {9'b0, mem9[ada[13:3]]};
      end else if (X36) begin
        if (WEA) begin
          mem[{ada[13:5], 1'b0}] <= merge(mem[{ada[13:5], 1'b0}], dia, ada[1:0]);
          mem[{ada[13:5], 1'b1}] <= merge(mem[{ada[13:5], 1'b1}], dib, ada[3:2]);
        end
      end else if (WEA) begin
        mem[ada[13:4]] <= merge(mem[ada[13:4]], dia, ada[1:0]);
        if (WRITEMODE_A == "READBEFOREWRITE") doa <= mem[ada[13:4]];
        else if (WRITEMODE_A == "WRITETHROUGH") doa <= merge(mem[ada[13:4]], dia, ada[1:0]);
      end else
        doa <= mem[ada[13:4]];
    end
  end

  always @(posedge CLKB) begin
    if (RSTB && REGMODE_B != "OUTREG") $fatal(1, "DP16KD model: RSTB is modelled only with an output register");
    if (RSTB) dob_q <= 0;
    else if (OCEB) dob_q <= dob;
    if (CEB) begin
      if (X9) begin
        if (WEB) begin
          mem9[adb[13:3]] <= dib[8:0];
          if (WRITEMODE_B == "READBEFOREWRITE") dob <= {9'b0, mem9[adb[13:3]]};
          else if (WRITEMODE_B == "WRITETHROUGH") dob <= {9'b0, dib[8:0]};
        end else
          dob <= {9'b0, mem9[adb[13:3]]};
      end else if (X36) begin
        if (WEB) $fatal(1, "DP16KD model: port B of a 36-bit RAM only reads");
        doa <= mem[{adb[13:5], 1'b0}];
        dob <= mem[{adb[13:5], 1'b1}];
      end else if (WEB) begin
        mem[adb[13:4]] <= merge(mem[adb[13:4]], dib, adb[1:0]);
        if (WRITEMODE_B == "READBEFOREWRITE") dob <= mem[adb[13:4]];
        else if (WRITEMODE_B == "WRITETHROUGH") dob <= merge(mem[adb[13:4]], dib, adb[1:0]);
      end else
        dob <= mem[adb[13:4]];
    end
  end
endmodule
